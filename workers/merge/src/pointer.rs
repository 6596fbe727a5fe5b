//! JSON Pointers (RFC 6901), the addresses of the merge's registers.
//!
//! A [`Pointer`] is parsed once into its reference tokens and keeps the text it came from.
//! Pointers order by their tokens, so in a sorted map the descendants of a path follow it
//! directly (see [`crate::state`]).
//!
//! Every token names an object key, even when it looks like a number: the merge has no array
//! indexing, so `/a/0` addresses the key `"0"` of the object at `/a`.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most reference tokens a pointer may have. Paths nest the document, and serde_json (like
/// most JSON parsers) refuses documents nested much deeper than this; the limit also keeps the
/// depth of every recursive walk over a merged document bounded.
pub const MAX_POINTER_DEPTH: usize = 64;

/// Why a string is not a pointer the merge accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PointerError {
    /// `""` points at the whole document, which a batch may not replace.
    #[error("the empty pointer addresses the whole document, which cannot be written; name a key such as \"/notes\"")]
    Empty,
    /// A non-empty pointer must start with `/`.
    #[error("a JSON Pointer must start with '/' (got {0:?})")]
    MissingLeadingSlash(String),
    /// `~` must be followed by `0` (for `~`) or `1` (for `/`).
    #[error(
        "invalid escape at byte {position} of {pointer:?}: '~' must be followed by '0' or '1'"
    )]
    InvalidEscape {
        /// The pointer as given.
        pointer: String,
        /// Byte offset of the offending `~`.
        position: usize,
    },
    /// More than [`MAX_POINTER_DEPTH`] tokens.
    #[error("the pointer has {depth} tokens; at most {MAX_POINTER_DEPTH} are allowed")]
    TooDeep {
        /// How many tokens the pointer has.
        depth: usize,
    },
}

/// A JSON Pointer (RFC 6901) parsed into reference tokens (`~1` → `/`, `~0` → `~`).
///
/// The empty pointer (the whole document) is refused: a batch cannot replace the root.
/// Every token is an object key; there is no array indexing.
///
/// A clone shares the parsed pointer: a session's map keys each register by the pointer the
/// register itself holds, and a 100,000-path session held them twice (~200 bytes each).
#[derive(Clone, Debug)]
pub struct Pointer(Arc<Parsed>);

#[derive(Debug)]
struct Parsed {
    /// The pointer's text exactly as parsed. Escaping is one-to-one once invalid escapes are
    /// refused, so this is also the canonical encoding of `tokens`.
    text: String,
    /// The unescaped reference tokens; never empty. Boxed: no spare capacity.
    tokens: Box<[String]>,
}

impl Pointer {
    fn new(text: String, tokens: Vec<String>) -> Pointer {
        Pointer(Arc::new(Parsed {
            text,
            tokens: tokens.into_boxed_slice(),
        }))
    }
}

impl Pointer {
    /// Parses an RFC 6901 pointer such as `/extinguishers/FE-01/pressure`.
    pub fn parse(text: &str) -> Result<Pointer, PointerError> {
        if text.is_empty() {
            return Err(PointerError::Empty);
        }
        let Some(body) = text.strip_prefix('/') else {
            return Err(PointerError::MissingLeadingSlash(text.to_owned()));
        };
        let mut tokens = Vec::new();
        let mut token = String::new();
        let mut chars = body.char_indices();
        while let Some((offset, ch)) = chars.next() {
            match ch {
                '/' => tokens.push(std::mem::take(&mut token)),
                '~' => match chars.next() {
                    Some((_, '0')) => token.push('~'),
                    Some((_, '1')) => token.push('/'),
                    _ => {
                        return Err(PointerError::InvalidEscape {
                            pointer: text.to_owned(),
                            // `offset` counts from after the leading '/'.
                            position: offset + 1,
                        });
                    }
                },
                other => token.push(other),
            }
        }
        tokens.push(token);
        if tokens.len() > MAX_POINTER_DEPTH {
            return Err(PointerError::TooDeep {
                depth: tokens.len(),
            });
        }
        Ok(Pointer::new(text.to_owned(), tokens))
    }

    /// Builds a pointer from unescaped tokens, with the same refusals as [`Pointer::parse`]
    /// (no tokens is the root; more than [`MAX_POINTER_DEPTH`] is too deep).
    pub fn from_tokens<I, S>(tokens: I) -> Result<Pointer, PointerError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tokens: Vec<String> = tokens.into_iter().map(Into::into).collect();
        if tokens.is_empty() {
            return Err(PointerError::Empty);
        }
        if tokens.len() > MAX_POINTER_DEPTH {
            return Err(PointerError::TooDeep {
                depth: tokens.len(),
            });
        }
        let mut text = String::new();
        for token in &tokens {
            text.push('/');
            text.push_str(&token.replace('~', "~0").replace('/', "~1"));
        }
        Ok(Pointer::new(text, tokens))
    }

    /// The pointer as RFC 6901 text.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The unescaped reference tokens, outermost first; never empty.
    pub fn tokens(&self) -> &[String] {
        &self.0.tokens
    }

    /// Whether `self` is a strict ancestor of `other` (`/a` of `/a/b`, not of `/a` or `/ab`).
    pub fn is_ancestor_of(&self, other: &Pointer) -> bool {
        let (this, other) = (self.tokens(), other.tokens());
        other.len() > this.len() && other.starts_with(this)
    }

    /// Whether the two paths are equal or one is an ancestor of the other.
    pub fn overlaps(&self, other: &Pointer) -> bool {
        let (this, other) = (self.tokens(), other.tokens());
        this.starts_with(other) || other.starts_with(this)
    }
}

// Equality and order look at the tokens only; `text` is a function of them.
impl PartialEq for Pointer {
    fn eq(&self, other: &Self) -> bool {
        self.tokens() == other.tokens()
    }
}

impl Eq for Pointer {}

impl PartialOrd for Pointer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pointer {
    fn cmp(&self, other: &Self) -> Ordering {
        self.tokens().cmp(other.tokens())
    }
}

impl std::hash::Hash for Pointer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.tokens().hash(state);
    }
}

/// Lets a map keyed by pointers be searched by a slice of tokens (an ancestor's prefix).
/// Consistent with `Ord`, which compares the same tokens.
impl Borrow<[String]> for Pointer {
    fn borrow(&self) -> &[String] {
        self.tokens()
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Pointer {
    type Err = PointerError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Pointer::parse(text)
    }
}

impl Serialize for Pointer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Pointer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pointer::parse(&text).map_err(serde::de::Error::custom)
    }
}
