// Fuzz check `pointer`: JSON Pointer (RFC 6901) parsing.
//
// Invariants: `Pointer::parse` never panics on any string; when it accepts one, the pointer
// keeps its text exactly, has 1..=MAX_POINTER_DEPTH tokens, parses again (from `as_str()`) to an
// equal pointer, is rebuilt identically (same text) from its unescaped tokens, and survives a
// serde JSON round trip. A refusal of a non-empty string that starts with '/' is only for an
// invalid `~` escape or too many tokens.
//
// Shared by `fuzz/fuzz_targets/pointer.rs` and `tests/e2e/fuzz_corpus.rs` (through `include!`).

use firemode_merge::{Pointer, PointerError, MAX_POINTER_DEPTH};

/// Checks one fuzz input; panics when an invariant breaks.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    match Pointer::parse(text) {
        Ok(pointer) => {
            assert_eq!(pointer.as_str(), text, "the pointer keeps its text");
            assert_eq!(pointer.to_string(), text);
            let tokens = pointer.tokens();
            assert!(!tokens.is_empty() && tokens.len() <= MAX_POINTER_DEPTH);
            assert_eq!(tokens.len(), text.matches('/').count());

            let again = Pointer::parse(pointer.as_str())
                .unwrap_or_else(|e| panic!("{text:?} parsed once but not again: {e}"));
            assert_eq!(again, pointer);
            assert_eq!(again.tokens(), tokens);

            let rebuilt = Pointer::from_tokens(tokens.iter().cloned())
                .unwrap_or_else(|e| panic!("the tokens of {text:?} do not rebuild it: {e}"));
            assert_eq!(rebuilt, pointer);
            assert_eq!(rebuilt.as_str(), text, "escaping is not one-to-one");

            let json = serde_json::to_string(&pointer)
                .unwrap_or_else(|e| panic!("a pointer serializes: {e}"));
            let loaded: Pointer = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("{json} does not load back: {e}"));
            assert_eq!(loaded, pointer);
            assert_eq!(loaded.as_str(), text);
        }
        Err(PointerError::Empty) => assert!(text.is_empty()),
        Err(PointerError::MissingLeadingSlash(given)) => {
            assert!(!text.starts_with('/'));
            assert_eq!(given, text);
        }
        Err(PointerError::InvalidEscape { pointer, position }) => {
            assert_eq!(pointer, text);
            assert_eq!(text.as_bytes().get(position), Some(&b'~'));
            assert!(!matches!(
                text.as_bytes().get(position + 1),
                Some(b'0') | Some(b'1')
            ));
        }
        Err(PointerError::TooDeep { depth }) => {
            assert!(depth > MAX_POINTER_DEPTH);
            assert_eq!(depth, text.matches('/').count());
        }
    }
}
