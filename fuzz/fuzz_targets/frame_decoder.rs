//! The device's and the host's frame decoder on arbitrary line bytes: fed in pieces of every
//! size the input chooses, it never panics, and every frame it accepts decodes or is refused.
#![no_main]

use firmware_protocol::frame::{FrameDecoder, MAX_ENCODED};
use firmware_protocol::message::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = (step as usize % 64) + 1;
    let mut decoder = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
    for piece in bytes.chunks(step) {
        let mut input = piece;
        while !input.is_empty() {
            let (n, frame) = decoder.feed(input);
            assert!(n >= 1 && n <= input.len(), "feed consumed {n} of {}", input.len());
            input = &input[n..];
            if let Some(Ok(frame)) = frame {
                let _ = frame.decode::<Request<'_>>();
                let _ = frame.decode::<Response<'_>>();
            }
        }
    }
});
