//! The return path: small framed messages from the destination to the source.
//!
//! ```text
//! frame   "LMRP" | type u8 | length u32 LE | payload[length]   (length <= 64 KiB)
//! type 1  CompatOk                 payload empty
//! type 2  CompatRefused            payload: UTF-8 reasons
//! type 3  Resumed                  payload: u64 LE microseconds from End to devices STOP
//!                                   (validate and load), then u64 LE microseconds from STOP to
//!                                   RUNNING (16 bytes; an 8-byte payload from an older peer
//!                                   carries the first field alone)
//! type 4  Failed                   payload: UTF-8 error (phase and what)
//! type 5  Capabilities             payload: u32 LE bits (CAP_*); sent before the compat
//!                                   answer, and only to a source whose stream header says
//!                                   minor >= 1 (older sources never see it)
//! type 6  RoundAck                 payload: u32 LE round, u32 reserved (0), u64 LE
//!                                   microseconds the destination's devices spent loading that
//!                                   round's state, u64 LE bytes they loaded (24 bytes): every
//!                                   page and record of the round is applied (only after
//!                                   Capabilities with CAP_ROUND_ACKS)
//! type 7  Undecided                payload: UTF-8 reason: the destination cannot say the VM
//!                                   does not run there (a vCPU entered the guest, a device
//!                                   reset failed, a vCPU start failed uncounted); sent only
//!                                   to a source whose stream header says minor >= 2 (an
//!                                   older source gets no answer, which it also reads as an
//!                                   unknown outcome)
//! ```
//!
//! Frames are validated before anything is allocated: magic, known type, length bound, exact
//! payload size for fixed payloads, valid UTF-8.

use std::io::{self, Read, Write};

const MAGIC: &[u8; 4] = b"LMRP";

/// [`Message::Capabilities`] bit: the destination acknowledges each pre-copy round once it has
/// applied all of it ([`Message::RoundAck`]), so the source can let data in flight land before
/// it stops the VM.
pub const CAP_ROUND_ACKS: u32 = 1;
const MAX_PAYLOAD: u32 = 64 << 10;

/// A return-path message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The destination accepts the compatibility descriptors; the source may send state.
    CompatOk,
    /// The destination refuses; nothing was changed on either side.
    CompatRefused(String),
    /// The destination loaded everything and its devices are RUNNING.
    Resumed {
        /// Microseconds from End to every device in STOP (the devices validated and loaded
        /// their state) on the destination.
        load_us: u64,
        /// Microseconds from STOP to RUNNING (P2P pass included).
        run_us: u64,
    },
    /// The destination failed and discarded what it received: no vCPU entered the guest there
    /// and every device it gave state to was reset. The VM does not run there.
    Failed(String),
    /// The destination failed but cannot promise the VM does not run there (a vCPU entered the
    /// guest, a device reset failed): the source must stay stopped until someone who knows
    /// decides. Only to sources whose stream is format 1.2 or later.
    Undecided(String),
    /// What the destination offers beyond the base protocol (`CAP_*` bits).
    Capabilities(u32),
    /// The destination has applied every page and record of this pre-copy round.
    RoundAck {
        /// The round.
        round: u32,
        /// Microseconds its devices spent loading the round's device state.
        device_load_us: u64,
        /// Device state bytes they loaded in the round.
        device_bytes: u64,
    },
}

impl Message {
    /// Writes the frame and flushes.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        let (ty, payload): (u8, Vec<u8>) = match self {
            Message::CompatOk => (1, Vec::new()),
            Message::CompatRefused(r) => (2, truncate(r)),
            Message::Resumed { load_us, run_us } => {
                let mut p = load_us.to_le_bytes().to_vec();
                p.extend_from_slice(&run_us.to_le_bytes());
                (3, p)
            }
            Message::Failed(r) => (4, truncate(r)),
            Message::Capabilities(bits) => (5, bits.to_le_bytes().to_vec()),
            Message::Undecided(r) => (7, truncate(r)),
            Message::RoundAck {
                round,
                device_load_us,
                device_bytes,
            } => {
                let mut p = round.to_le_bytes().to_vec();
                p.extend_from_slice(&[0; 4]);
                p.extend_from_slice(&device_load_us.to_le_bytes());
                p.extend_from_slice(&device_bytes.to_le_bytes());
                (6, p)
            }
        };
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.extend_from_slice(MAGIC);
        frame.push(ty);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload);
        w.write_all(&frame)?;
        w.flush()
    }

    /// Reads one frame. The end of input is `UnexpectedEof`, saying whether it came before a
    /// frame or inside one (and how much of it arrived).
    pub fn read_from<R: Read + ?Sized>(r: &mut R) -> io::Result<Message> {
        let mut h = [0u8; 9];
        fill(r, &mut h, |n| match n {
            0 => "return path: closed before the next message".into(),
            n => format!("return path: ended inside a frame header ({n} of 9 bytes)"),
        })?;
        if &h[..4] != MAGIC {
            return Err(bad(format!(
                "return path: bad magic {:02x?} (expected \"LMRP\")",
                &h[..4]
            )));
        }
        let ty = h[4];
        let len = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
        if len > MAX_PAYLOAD {
            return Err(bad(format!(
                "return path: message type {ty} claims {len} bytes (limit {MAX_PAYLOAD})"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        fill(r, &mut payload, |n| {
            format!("return path: ended inside a type-{ty} message ({n} of {len} payload bytes)")
        })?;
        let text = |p: Vec<u8>| {
            String::from_utf8(p)
                .map_err(|_| bad(format!("return path: message type {ty} is not UTF-8")))
        };
        match ty {
            1 if len == 0 => Ok(Message::CompatOk),
            2 => Ok(Message::CompatRefused(text(payload)?)),
            3 if len == 8 || len == 16 => {
                let word = |i: usize| {
                    payload
                        .get(8 * i..8 * i + 8)
                        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                };
                Ok(Message::Resumed {
                    load_us: word(0),
                    run_us: word(1),
                })
            }
            4 => Ok(Message::Failed(text(payload)?)),
            5 if len == 4 => Ok(Message::Capabilities(u32::from_le_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ]))),
            6 if len == 24 => {
                if payload[4..8] != [0; 4] {
                    return Err(bad(
                        "return path: RoundAck reserved bytes are not zero".into()
                    ));
                }
                let u64_at = |at: usize| {
                    u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"))
                };
                Ok(Message::RoundAck {
                    round: u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]),
                    device_load_us: u64_at(8),
                    device_bytes: u64_at(16),
                })
            }
            7 => Ok(Message::Undecided(text(payload)?)),
            1 | 3 | 5 | 6 => Err(bad(format!(
                "return path: message type {ty} with a {len}-byte payload"
            ))),
            other => Err(bad(format!("return path: unknown message type {other}"))),
        }
    }
}

/// Fills `buf`; at the end of input, `UnexpectedEof` with `eof(bytes read)` as its text.
fn fill<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    eof: impl FnOnce(usize) -> String,
) -> io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, eof(n))),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn truncate(s: &str) -> Vec<u8> {
    let mut end = s.len().min(MAX_PAYLOAD as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.as_bytes()[..end].to_vec()
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_frames() {
        for m in [
            Message::CompatOk,
            Message::CompatRefused("device 0: identity differs".into()),
            Message::Resumed {
                load_us: 1234,
                run_us: 56,
            },
            Message::Failed("resume: device 1".into()),
            Message::Undecided("resume: vCPUs entered the guest".into()),
            Message::Capabilities(CAP_ROUND_ACKS),
            Message::RoundAck {
                round: 7,
                device_load_us: 1500,
                device_bytes: 1 << 20,
            },
        ] {
            let mut b = Vec::new();
            m.write_to(&mut b).unwrap();
            assert_eq!(Message::read_from(&mut b.as_slice()).unwrap(), m);
            // Every truncation is an error, never a panic.
            for cut in 0..b.len() {
                assert!(Message::read_from(&mut &b[..cut]).is_err());
            }
        }
        let e = Message::read_from(&mut &b"LMRP\x09\0\0\0\0"[..]).unwrap_err();
        assert!(e.to_string().contains("unknown message type 9"), "{e}");
        let e = Message::read_from(&mut &b"LMRP\x02\xff\xff\xff\xff"[..]).unwrap_err();
        assert!(e.to_string().contains("claims"), "{e}");
        let e = Message::read_from(&mut &b"XXXX\x01\0\0\0\0"[..]).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
        let old = Message::read_from(&mut &b"LMRP\x03\x08\0\0\0\x07\0\0\0\0\0\0\0"[..]).unwrap();
        assert_eq!(
            old,
            Message::Resumed {
                load_us: 7,
                run_us: 0
            },
            "an older peer's 8-byte Resumed"
        );
        let e = Message::read_from(&mut &b"LMRP\x06\x02\0\0\0\0\0"[..]).unwrap_err();
        assert!(
            e.to_string().contains("type 6 with a 2-byte payload"),
            "{e}"
        );
        let e = Message::read_from(&mut &b"LMRP\x03\x01\0\0\0\0"[..]).unwrap_err();
        assert!(e.to_string().contains("1-byte payload"), "{e}");
        // The end of input says where it came.
        let e = Message::read_from(&mut &b""[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(e.to_string(), "return path: closed before the next message");
        let e = Message::read_from(&mut &b"LMRP\x04"[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            e.to_string(),
            "return path: ended inside a frame header (5 of 9 bytes)"
        );
        let e = Message::read_from(&mut &b"LMRP\x04\x03\0\0\0ab"[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            e.to_string(),
            "return path: ended inside a type-4 message (2 of 3 payload bytes)"
        );
    }
}
