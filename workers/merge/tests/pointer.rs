//! RFC 6901 parsing: escapes, refusals, and the text round trip.

use firemode_merge::{Pointer, PointerError, MAX_POINTER_DEPTH};
use proptest::prelude::*;

fn tokens(text: &str) -> Vec<String> {
    match Pointer::parse(text) {
        Ok(pointer) => pointer.tokens().to_vec(),
        Err(error) => panic!("{text:?} should parse: {error}"),
    }
}

#[test]
fn plain_paths_split_on_slashes() {
    assert_eq!(
        tokens("/extinguishers/FE-01/pressure"),
        ["extinguishers", "FE-01", "pressure"]
    );
    assert_eq!(tokens("/a"), ["a"]);
}

#[test]
fn empty_tokens_are_keys_too() {
    // "/" is the key "" of the root; "/a/" is key "" under "a".
    assert_eq!(tokens("/"), [""]);
    assert_eq!(tokens("/a/"), ["a", ""]);
    assert_eq!(tokens("//"), ["", ""]);
}

#[test]
fn escapes_decode_tilde_one_before_tilde_zero() {
    assert_eq!(tokens("/a~1b"), ["a/b"]);
    assert_eq!(tokens("/m~0n"), ["m~n"]);
    // RFC 6901 §4: "~01" is "~1", not "/".
    assert_eq!(tokens("/~01"), ["~1"]);
    assert_eq!(tokens("/~10"), ["/0"]);
}

#[test]
fn numbers_are_object_keys() {
    assert_eq!(tokens("/a/0"), ["a", "0"]);
}

#[test]
fn the_empty_pointer_is_refused() {
    assert_eq!(Pointer::parse(""), Err(PointerError::Empty));
}

#[test]
fn a_missing_leading_slash_is_refused() {
    assert_eq!(
        Pointer::parse("a/b"),
        Err(PointerError::MissingLeadingSlash("a/b".to_owned()))
    );
    assert!(matches!(
        Pointer::parse("#/a"),
        Err(PointerError::MissingLeadingSlash(_))
    ));
}

#[test]
fn bad_escapes_are_refused_with_their_position() {
    for (text, position) in [("/a~", 2), ("/a~2", 2), ("/~x/b", 1), ("/ok/b~", 5)] {
        assert_eq!(
            Pointer::parse(text),
            Err(PointerError::InvalidEscape {
                pointer: text.to_owned(),
                position
            }),
            "{text}"
        );
    }
}

#[test]
fn too_deep_pointers_are_refused() {
    let deepest = "/k".repeat(MAX_POINTER_DEPTH);
    assert!(Pointer::parse(&deepest).is_ok());
    assert_eq!(
        Pointer::parse(&format!("{deepest}/k")),
        Err(PointerError::TooDeep {
            depth: MAX_POINTER_DEPTH + 1
        })
    );
}

#[test]
fn as_str_and_display_give_the_text_back() {
    let pointer = Pointer::parse("/a~1b/~0").expect("valid pointer");
    assert_eq!(pointer.as_str(), "/a~1b/~0");
    assert_eq!(pointer.to_string(), "/a~1b/~0");
}

#[test]
fn ancestry_is_by_whole_tokens() {
    let a = Pointer::parse("/a").expect("valid");
    let ab = Pointer::parse("/a/b").expect("valid");
    let a_slash_b = Pointer::parse("/a~1b").expect("valid");
    let abc = Pointer::parse("/abc").expect("valid");
    assert!(a.is_ancestor_of(&ab));
    assert!(!ab.is_ancestor_of(&a));
    assert!(!a.is_ancestor_of(&a));
    assert!(!a.is_ancestor_of(&a_slash_b));
    assert!(!a.is_ancestor_of(&abc));
    assert!(a.overlaps(&ab) && ab.overlaps(&a) && a.overlaps(&a));
    assert!(!a.overlaps(&abc));
}

#[test]
fn serde_uses_the_text_and_refuses_bad_pointers() {
    let pointer: Pointer = serde_json::from_str("\"/a~1b\"").expect("valid pointer");
    assert_eq!(pointer.tokens(), ["a/b"]);
    assert_eq!(
        serde_json::to_string(&pointer).expect("serializes"),
        "\"/a~1b\""
    );
    assert!(serde_json::from_str::<Pointer>("\"a\"").is_err());
    assert!(serde_json::from_str::<Pointer>("\"\"").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Any tokens encode to a pointer that parses back to the same tokens and text.
    #[test]
    fn tokens_round_trip(raw in proptest::collection::vec("[a-z~/0-9]{0,4}", 1..6)) {
        let built = Pointer::from_tokens(raw.clone()).expect("non-empty and shallow");
        let parsed = Pointer::parse(built.as_str()).expect("encoded pointer parses");
        prop_assert_eq!(parsed.tokens(), &raw[..]);
        prop_assert_eq!(parsed.as_str(), built.as_str());
        prop_assert_eq!(parsed, built);
    }

    /// Parsing never panics, and what parses re-encodes to the same text.
    #[test]
    fn parse_is_total(text in "[/a~01]{0,12}") {
        if let Ok(pointer) = Pointer::parse(&text) {
            let rebuilt = Pointer::from_tokens(pointer.tokens().to_vec()).expect("tokens are valid");
            prop_assert_eq!(rebuilt.as_str(), text.as_str());
        }
    }
}
