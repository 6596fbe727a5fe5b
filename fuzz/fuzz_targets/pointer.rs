#![no_main]

mod check {
    include!("../checks/pointer.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
