//! Signed notes and checkpoints: never panic; a parsed checkpoint prints back the same.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use troop_ledger::note::{Checkpoint, NoteSigner};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let verifier = NoteSigner::new("fuzz.example/log", SigningKey::from_bytes(&[1; 32])).expect("signer").verifier();
    let _ = verifier.open(text);
    let _ = Checkpoint::open(text, &verifier);
    if let Ok(cp) = Checkpoint::parse(text) {
        assert_eq!(Checkpoint::parse(&cp.to_text()).expect("reparses"), cp);
    }
    let _ = troop_ledger::note::NoteVerifier::from_key_string(text);
    let _ = NoteSigner::from_key_string(text);
});
