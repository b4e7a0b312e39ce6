//! tlog-proof files: never panic; a parsed proof prints and reparses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use troop_ledger::proof::TlogProof;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = TlogProof::parse(text) {
        assert_eq!(TlogProof::parse(&p.to_text()).expect("reparses"), p);
    }
});
