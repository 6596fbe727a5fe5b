// Fuzz check `config`: parsing and validating the TOML config file.
//
// The input is read as UTF-8 TOML straight into `firemode_config::Config` with the `toml` crate
// (the same serde model `firemode_config::load` extracts through figment, without reading the
// process environment). Invariants: neither parsing nor `validate()` panics on any input; a
// config that validates survives the hand-over to workers, `Config::from_json(&c.to_json())`,
// unchanged; and its `check-config` rendering (`to_toml`) parses back to the same config.
//
// Shared by `fuzz/fuzz_targets/config.rs` and `tests/e2e/fuzz_corpus.rs` (through `include!`).

use firemode_config::Config;

/// Checks one fuzz input; panics when an invariant breaks.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<Config>(text) else {
        return;
    };
    if let Err(errors) = config.validate() {
        assert!(!errors.0.is_empty(), "a refusal names no key");
        for error in &errors.0 {
            assert!(
                !error.key.is_empty(),
                "an error without its key: {}",
                error.message
            );
        }
        return;
    }
    let json = config.to_json();
    match Config::from_json(&json) {
        Ok(back) => assert_eq!(back, config, "the worker config differs: {json}"),
        Err(e) => panic!("a valid config does not survive the JSON hand-over: {e}\n{json}"),
    }
    let rendered = config.to_toml();
    match toml::from_str::<Config>(&rendered) {
        Ok(back) => assert_eq!(
            back, config,
            "check-config output reads differently:\n{rendered}"
        ),
        Err(e) => panic!("check-config output is not a config: {e}\n{rendered}"),
    }
}
