//! `ByteSize`: a size written as a number of bytes or a human string (`"256MiB"`, `"1G"`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

/// Why a size does not read; each message shows how to write one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    #[error("invalid size {text:?}; write it like 268435456, \"256MiB\" or \"1G\"")]
    NotANumber { text: String },
    #[error("unknown size unit {unit:?} in {text:?}; use K, M or G (binary)")]
    UnknownUnit { unit: String, text: String },
    #[error("size {text:?} is too large")]
    TooLarge { text: String },
}

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, ByteSizeError> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| ByteSizeError::NotANumber {
            text: text.to_owned(),
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => {
                return Err(ByteSizeError::UnknownUnit {
                    unit: other.to_owned(),
                    text: text.to_owned(),
                })
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| ByteSizeError::TooLarge {
                text: text.to_owned(),
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn parses_and_prints() {
        assert_eq!(ByteSize::parse("256MiB"), Ok(ByteSize(256 << 20)));
        assert_eq!(ByteSize::parse("1G"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(0).to_string(), "0");
    }

    #[test]
    fn refusals_say_how_to_write_a_size() {
        let text = |s: &str| ByteSize::parse(s).unwrap_err().to_string();
        assert_eq!(
            text("12 parsecs"),
            "unknown size unit \"parsecs\" in \"12 parsecs\"; use K, M or G (binary)"
        );
        assert_eq!(
            text("x"),
            "invalid size \"x\"; write it like 268435456, \"256MiB\" or \"1G\""
        );
        assert_eq!(text("99999999999G"), "size \"99999999999G\" is too large");
    }
}
