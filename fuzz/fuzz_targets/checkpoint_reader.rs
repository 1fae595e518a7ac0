//! The checkpoint reader on arbitrary file bytes (and on well-formed headers around arbitrary
//! payloads, so that the postcard and JSON decoders behind the digest are reached): no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pnn::run::checkpoint::Checkpoint;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let _ = Checkpoint::from_bytes(data);
    let mut file = b"PNNCKPT1".to_vec();
    file.extend((data.len() as u64).to_le_bytes());
    file.extend(Sha256::digest(data));
    file.extend(data);
    if let Ok(c) = Checkpoint::from_bytes(&file) {
        // What reads back must survive the same checks a resume makes.
        let _ = c.check_compatible(&c.identity, std::path::Path::new("fuzz"));
        let _ = c.host_state();
    }
});
