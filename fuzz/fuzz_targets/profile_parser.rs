//! Device profiles (`sim:<profile.ron>`, `pnn-emulate --profile`): any text is parsed and
//! validated or refused with a located error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pnn_sim::profile::DeviceProfile;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = DeviceProfile::parse(text, "fuzz.ron");
    }
});
