//! The device-side server takes arbitrary byte streams: good request frames, damaged copies of
//! them (bits flipped, cut short, delimiters lost), and plain garbage, fed in pieces of any size.
//! It never panics, every reply it writes is one whole, valid frame, it answers at most one
//! reply per frame delimiter it receives, and its memory stays bounded (a counting allocator
//! measures the peak growth while it serves).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use firmware_protocol::direction::DirectionSeed;
use firmware_protocol::frame::{self, FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use firmware_protocol::message::{
    ActivationEncoding, ChunkRange, ForwardMode, Packed, Request, Response,
};
use firmware_protocol::server::ServerIo;
use pnn_emulator::{self as emulator, EmulatorConfig};
use proptest::prelude::*;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One piece of the stream.
#[derive(Clone, Debug)]
enum Piece {
    /// A well-formed request frame (kind, fields).
    Good(u8, u32, u32, u16),
    /// That frame with one byte changed.
    Flipped(u8, u32, u32, u16, usize, u8),
    /// That frame cut short (its delimiter kept or not).
    Cut(u8, u32, u32, u16, usize, bool),
    Garbage(Vec<u8>),
}

fn request_frame(kind: u8, a: u32, b: u32, seq: u16) -> Vec<u8> {
    let values: Vec<f32> = (0..(a % 40)).map(|i| i as f32 * 0.25 - 3.0).collect();
    let seeds: Vec<DirectionSeed> = (0..(b % 70) as u64).map(DirectionSeed).collect();
    let layer = (b % 3) as u8;
    let chunk = ChunkRange {
        start: a % 20,
        end: b % 30,
    };
    let request = match kind % 9 {
        0 => Request::Hello {
            protocol_version: 1,
        },
        1 => Request::LoadInput {
            layer,
            rows: b % 80,
            offset: a % 50,
            values: Packed::Items(&values),
        },
        2 => Request::SetParameters {
            layer,
            offset: a % 30,
            values: Packed::Items(&values),
        },
        3 => Request::EvaluatePerturbed {
            layer,
            chunk,
            eps: 0.01,
            seeds: Packed::Items(&seeds),
        },
        4 => Request::Forward {
            layer,
            mode: ForwardMode::Train,
        },
        5 => Request::ReadResult { offset: a },
        6 => Request::ReadParameters { layer },
        7 => Request::DescribeLayer { layer },
        _ => Request::Reset,
    };
    let mut scratch = vec![0u8; MAX_PAYLOAD];
    let mut out = vec![0u8; MAX_ENCODED + 1];
    let n = frame::encode(seq, &request, &mut scratch, &mut out).unwrap();
    out.truncate(n);
    out
}

fn piece() -> impl Strategy<Value = Piece> {
    let fields = (any::<u8>(), any::<u32>(), any::<u32>(), any::<u16>());
    prop_oneof![
        3 => fields.prop_map(|(k, a, b, s)| Piece::Good(k, a, b, s)),
        2 => (fields, any::<usize>(), 1u8..=255)
            .prop_map(|((k, a, b, s), at, x)| Piece::Flipped(k, a, b, s, at, x)),
        1 => (fields, any::<usize>(), any::<bool>())
            .prop_map(|((k, a, b, s), at, delim)| Piece::Cut(k, a, b, s, at, delim)),
        2 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Piece::Garbage),
    ]
}

fn bytes_of(p: &Piece) -> Vec<u8> {
    match p {
        Piece::Good(k, a, b, s) => request_frame(*k, *a, *b, *s),
        Piece::Flipped(k, a, b, s, at, x) => {
            let mut f = request_frame(*k, *a, *b, *s);
            let at = at % f.len();
            f[at] ^= x;
            f
        }
        Piece::Cut(k, a, b, s, at, delim) => {
            let mut f = request_frame(*k, *a, *b, *s);
            f.truncate(at % f.len());
            if *delim {
                f.push(0);
            }
            f
        }
        Piece::Garbage(g) => g.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn the_server_takes_any_byte_stream(
        pieces in proptest::collection::vec(piece(), 1..40),
        step in 1usize..700,
        frame_cap in prop_oneof![Just(MAX_PAYLOAD), 128usize..2048],
    ) {
        let config = EmulatorConfig {
            encoding: ActivationEncoding::AdcU8 { scale: 0.1 },
            max_batch: 64,
            boot_id: 7,
            ..EmulatorConfig::new("fuzz", vec![dense(3, 2), dense(2, 2)])
        };
        let stream: Vec<u8> = pieces.iter().flat_map(bytes_of).collect();
        let delimiters = stream.iter().filter(|&&b| b == 0).count();
        let mut replies: Vec<Vec<u8>> = Vec::new();

        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        {
            let mut server = emulator::server(&config).expect("a valid device");
            server.set_max_request(frame_cap as u32);
            let mut io = ServerIo {
                decoder: FrameDecoder::new(vec![0u8; frame::wire_len(frame_cap)]),
                payload: vec![0u8; frame_cap],
                out: vec![0u8; frame::wire_len(frame_cap)],
            };
            for part in stream.chunks(step) {
                server
                    .serve(&mut io, part, |reply| {
                        replies.push(reply.to_vec());
                        Ok::<(), ()>(())
                    })
                    .unwrap();
            }
        }
        let growth = PEAK.load(Ordering::Relaxed) - base;
        // Buffers of a few frames, the layers, and results of at most 64 rows x 64 directions.
        prop_assert!(growth < 2 << 20, "{growth} bytes allocated while serving");

        prop_assert!(replies.len() <= delimiters);
        if pieces.iter().all(|p| matches!(p, Piece::Good(..))) {
            // A frame longer than the device's buffer is dropped unanswered (its sequence
            // number was never read; the host, which knows the limit, never sends one).
            let fits = pieces
                .iter()
                .filter(|p| {
                    let mut d = FrameDecoder::new(vec![0u8; frame::wire_len(frame_cap)]);
                    !matches!(d.feed(&bytes_of(p)).1, Some(Err(frame::FrameError::Oversize)))
                })
                .count();
            prop_assert_eq!(replies.len(), fits, "one reply per good frame that fits");
        }
        let mut decoder = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        for reply in &replies {
            prop_assert_eq!(reply.iter().filter(|&&b| b == 0).count(), 1);
            prop_assert_eq!(*reply.last().unwrap(), 0);
            prop_assert!(reply.len() <= frame::wire_len(frame_cap));
            let (used, f) = decoder.feed(reply);
            prop_assert_eq!(used, reply.len());
            let f = f.expect("a whole frame").expect("a valid frame");
            prop_assert!(postcard::from_bytes::<Response>(f.body).is_ok());
        }
    }
}

/// A frame that fails its CRC is answered with a NAK under the number it carried, and the
/// retransmission that follows is served normally.
#[test]
fn a_damaged_request_is_nakked_under_its_sequence_number() {
    use firmware_protocol::message::DeviceError;
    let config = EmulatorConfig {
        max_batch: 8,
        ..EmulatorConfig::new("nak", vec![dense(3, 2)])
    };
    let mut server = emulator::server(&config).expect("a valid device");
    let mut io = ServerIo {
        decoder: FrameDecoder::new(vec![0u8; MAX_ENCODED]),
        payload: vec![0u8; MAX_PAYLOAD],
        out: vec![0u8; MAX_ENCODED + 1],
    };
    let good = request_frame(7, 0, 0, 0x1234); // DescribeLayer
    let mut damaged = good.clone();
    // A byte of the CRC (the last before the delimiter), changed to another non-zero value.
    let at = damaged.len() - 2;
    damaged[at] = if damaged[at] == 0x55 { 0x56 } else { 0x55 };
    let mut replies = Vec::new();
    for bytes in [&damaged, &good] {
        server
            .serve(&mut io, bytes, |r| {
                replies.push(r.to_vec());
                Ok::<(), ()>(())
            })
            .unwrap();
    }
    let mut decoder = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
    let mut decoded = Vec::new();
    for r in &replies {
        let f = decoder.feed(r).1.unwrap().unwrap();
        decoded.push((f.seq, f.body.to_vec()));
    }
    let response = |i: usize| postcard::from_bytes::<Response>(&decoded[i].1).unwrap();
    assert_eq!(decoded.len(), 2);
    assert_eq!(decoded[0].0, 0x1234);
    assert_eq!(response(0), Response::Error(DeviceError::Corrupt));
    assert_eq!(decoded[1].0, 0x1234);
    assert!(
        matches!(response(1), Response::Layer(_)),
        "{:?}",
        response(1)
    );
    assert_eq!(server.stats().naks, 1);
}

fn dense(inputs: usize, outputs: usize) -> firmware_protocol::shape::LayerShape {
    firmware_protocol::shape::LayerShape::dense(inputs, outputs)
}

#[test]
fn a_frame_too_long_for_the_device_is_dropped_unanswered() {
    // Found by the property above: an evaluation request with 19 seeds (176 bytes on the wire)
    // against a device that takes frames of 128 bytes.
    let stream = request_frame(174, 0, 7_076_179, 0);
    let frame_cap = 128;
    assert!(stream.len() > frame::wire_len(frame_cap));
    let config = EmulatorConfig::new("fuzz", vec![dense(3, 2), dense(2, 2)]);
    let mut server = emulator::server(&config).expect("a valid device");
    server.set_max_request(frame_cap as u32);
    let mut io = ServerIo {
        decoder: FrameDecoder::new(vec![0u8; frame::wire_len(frame_cap)]),
        payload: vec![0u8; frame_cap],
        out: vec![0u8; frame::wire_len(frame_cap)],
    };
    let mut replies = 0;
    let mut serve = |bytes: &[u8], io: &mut ServerIo<Vec<u8>>| {
        server
            .serve(io, bytes, |_| {
                replies += 1;
                Ok::<(), ()>(())
            })
            .unwrap()
    };
    serve(&stream, &mut io);
    // The next frame that fits is answered: the decoder resynchronised.
    serve(&request_frame(0, 0, 0, 1), &mut io);
    assert_eq!(replies, 1);
}
