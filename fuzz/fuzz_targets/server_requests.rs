//! The device server (as the emulator runs it, over a dense layer and a CNN block) answering
//! arbitrary request bodies, in sequence: no panic, and every reply is a frame within the output
//! buffer. Inputs are split at 0xFF bytes into requests; each starts with its sequence number.
#![no_main]

use std::sync::OnceLock;

use firmware_protocol::frame::{MAX_ENCODED, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use pnn_emulator::{EmulatorConfig, parse_layers, server};

fn config() -> &'static EmulatorConfig {
    static CONFIG: OnceLock<EmulatorConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let layers = parse_layers("12x5,conv1x4x4:2", 3, 1).expect("the fuzz device's layers");
        let mut c = EmulatorConfig::new("fuzz", layers);
        c.max_batch = 8;
        c
    })
}

fuzz_target!(|data: &[u8]| {
    let mut device = server(config()).expect("the fuzz device builds");
    let mut payload = vec![0u8; MAX_PAYLOAD];
    let mut out = vec![0u8; MAX_ENCODED + 1];
    for request in data.split(|&b| b == 0xFF).filter(|r| r.len() >= 2) {
        let seq = u16::from_le_bytes([request[0], request[1]]);
        if let Ok(n) = device.respond(seq, &request[2..], &mut payload, &mut out) {
            assert!(n <= out.len());
        }
    }
});
