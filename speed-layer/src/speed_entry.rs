//! The values of the Redis speed view ([`crate::redis_store`]): strings of
//! *frames*.
//!
//! A frame is `[payload length: u32, little-endian][batch id: 8 bytes][payload]`.
//! A bucket-hour's log holds one frame per batch and bucket-hour (`APPEND`),
//! its payload a protobuf [`BucketEntry`]: that batch's sums for each of the
//! bucket's merchants it touched in the hour. A merchant's merged field holds
//! one frame whose payload is a [`SpeedEntry`] (prost; the field numbers below
//! are the format). The batch id names the delivery that wrote the frame, so
//! a batch cut off part way can be taken out again (see the undo in
//! [`crate::redis_store`]); frames written by a compaction or by the rebuild
//! carry [`MERGED_ID`]. Counters are exact sums; sketches are Apache
//! DataSketches HLL ([`tally_common::sketch`]), the batch layer's format.

use prost::Message as _;
use tally_common::metrics::Counters;
use tally_common::sketch::{CustomerSketch, CustomerUnion};
use tally_common::{Error, Result};

use crate::aggregate::HourUpdate;

/// Bytes before a frame's payload: its length (4) and its batch id (8).
pub const FRAME_HEADER: usize = 12;

/// The batch id of a frame that merges others (a compaction, the rebuild).
pub const MERGED_ID: [u8; 8] = [0; 8];

/// One merchant-hour's sums from one batch, a compaction or the rebuild.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpeedEntry {
    /// The 15-minute slots with anything to add, any order, each at most once.
    #[prost(message, repeated, tag = "1")]
    pub slots: Vec<SlotEntry>,
}

/// One batch's sums for the merchants of one bucket-hour (a log frame's payload).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BucketEntry {
    /// Each merchant of the bucket-hour the batch touched, at most once.
    #[prost(message, repeated, tag = "1")]
    pub merchants: Vec<MerchantEntry>,
}

/// One merchant's share of a [`BucketEntry`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct MerchantEntry {
    /// The merchant id.
    #[prost(string, tag = "1")]
    pub merchant: String,
    /// Its [`SpeedEntry`], encoded (kept as bytes: a reader decodes only its
    /// own merchant's).
    #[prost(bytes = "bytes", tag = "2")]
    pub entry: bytes::Bytes,
}

/// One 15-minute slot's share of a [`SpeedEntry`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct SlotEntry {
    /// The slot of the hour, 0 to 3.
    #[prost(uint32, tag = "1")]
    pub slot: u32,
    /// Counter sums in [`Counters::values`] order (zigzag varints); a newer
    /// writer's extra counters are ignored, missing ones are zero.
    #[prost(sint64, repeated, tag = "2")]
    pub counters: Vec<i64>,
    /// The slot's distinct customers, a serialized sketch, when it has any.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub sketch: Option<Vec<u8>>,
}

impl SpeedEntry {
    /// From per-slot counters and serialized sketches; slots with nothing to
    /// add are left out.
    fn from_slots(slots: impl IntoIterator<Item = (Counters, Option<Vec<u8>>)>) -> Self {
        SpeedEntry {
            slots: slots
                .into_iter()
                .enumerate()
                .filter(|(_, (c, sketch))| !c.is_zero() || sketch.is_some())
                .map(|(q, (c, sketch))| SlotEntry {
                    slot: q as u32,
                    counters: c.values.to_vec(),
                    sketch,
                })
                .collect(),
        }
    }

    /// A batch's share of one merchant-hour, sketches built here (the client),
    /// so the engine's work is one `APPEND`.
    pub fn from_update(u: &HourUpdate) -> Self {
        Self::from_slots((0..4).map(|q| (u.quarters[q], u.sketch(q))))
    }

    /// From per-slot sums and sketches (the rebuild's).
    pub fn from_parts(quarters: &[Counters; 4], sketches: &[CustomerSketch; 4]) -> Self {
        Self::from_slots((0..4).map(|q| {
            (
                quarters[q],
                (!sketches[q].is_empty()).then(|| sketches[q].to_bytes()),
            )
        }))
    }

    /// This entry as one frame of batch `id`.
    pub fn to_frame(&self, id: &[u8; 8]) -> Vec<u8> {
        frame(id, &self.encode_to_vec())
    }
}

/// One frame: `payload` (an encoded [`SpeedEntry`]) of batch `id`.
pub fn frame(id: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(payload);
    out
}

/// One frame of a stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The batch that wrote it ([`MERGED_ID`] for a compaction or the rebuild).
    pub id: [u8; 8],
    /// Its [`SpeedEntry`], encoded.
    pub payload: &'a [u8],
    /// The whole frame, header included.
    pub bytes: &'a [u8],
}

/// The frames of a stored value, in order. Errors: the value is cut short or
/// is not frames.
pub fn frames(value: &[u8]) -> Result<Vec<Frame<'_>>> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let bad = || Error::speed("a speed-view value is not a sequence of frames (cut short?)");
        if rest.len() < FRAME_HEADER {
            return Err(bad());
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let id: [u8; 8] = rest[4..FRAME_HEADER].try_into().expect("8 bytes");
        let end = FRAME_HEADER.checked_add(len).ok_or_else(bad)?;
        if rest.len() < end {
            return Err(bad());
        }
        out.push(Frame {
            id,
            payload: &rest[FRAME_HEADER..end],
            bytes: &rest[..end],
        });
        rest = &rest[end..];
    }
    Ok(out)
}

/// One merchant-hour's sums, per 15-minute slot, from any number of frames.
#[derive(Debug, Clone, Default)]
pub struct HourSums {
    /// Counter sums per slot.
    pub quarters: [Counters; 4],
    /// Distinct customers per slot.
    pub unions: [CustomerUnion; 4],
}

impl HourSums {
    /// Add every frame of a stored value. Errors: the value or a payload does
    /// not decode (counters must be exact, so the read fails rather than
    /// leave a frame out); a sketch that does not parse is skipped, logged (an
    /// estimate, beside exact counters).
    pub fn add_value(&mut self, value: &[u8]) -> Result<()> {
        for f in frames(value)? {
            self.add_payload(f.payload)?;
        }
        Ok(())
    }

    /// Add one frame's payload. Errors as [`HourSums::add_value`].
    pub fn add_payload(&mut self, payload: &[u8]) -> Result<()> {
        let entry = SpeedEntry::decode(payload)
            .map_err(|e| Error::speed_from("a speed-view frame does not decode", e))?;
        for s in entry.slots {
            let q = s.slot as usize;
            if q >= 4 {
                return Err(Error::speed(format!(
                    "a speed-view frame names slot {q} (0 to 3)"
                )));
            }
            let mut c = Counters::default();
            for (v, x) in c.values.iter_mut().zip(&s.counters) {
                *v = *x;
            }
            self.quarters[q].merge(&c);
            if let Some(sketch) = &s.sketch {
                if let Err(err) = self.unions[q].add_bytes(sketch) {
                    tracing::warn!(error = %err, "a speed-view sketch does not parse; skipped");
                }
            }
        }
        Ok(())
    }

    /// The sums as one entry (what a compaction writes).
    pub fn to_entry(&self) -> SpeedEntry {
        SpeedEntry::from_slots((0..4).map(|q| {
            let union = &self.unions[q];
            (
                self.quarters[q],
                (!union.is_empty()).then(|| union.to_bytes()),
            )
        }))
    }

    /// The counters over the whole hour.
    pub fn hour_counters(&self) -> Counters {
        let mut c = Counters::default();
        for q in &self.quarters {
            c.merge(q);
        }
        c
    }
}

/// Each merchant's encoded [`SpeedEntry`] in a bucket-hour's log, frame by
/// frame (`id`, merchant, entry), in order. Errors: the log or a frame's
/// [`BucketEntry`] does not decode.
pub fn log_entries(log: &[u8]) -> Result<Vec<([u8; 8], MerchantEntry)>> {
    let mut out = Vec::new();
    for f in frames(log)? {
        out.extend(
            bucket_entry(f.payload)?
                .merchants
                .into_iter()
                .map(|m| (f.id, m)),
        );
    }
    Ok(out)
}

/// A log frame's payload. Errors: it does not decode.
pub fn bucket_entry(payload: &[u8]) -> Result<BucketEntry> {
    BucketEntry::decode(payload)
        .map_err(|e| Error::speed_from("a speed-view log frame does not decode", e))
}

/// The counters over the hour of a stored value (all its frames); for tests
/// and tools that look at the keys. Errors as [`HourSums::add_value`].
pub fn value_counters(value: &[u8]) -> Result<Counters> {
    let mut sums = HourSums::default();
    sums.add_value(value)?;
    Ok(sums.hour_counters())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::metrics::Metric;

    fn entry(q: u32, orders: i64, customer: Option<&str>) -> SpeedEntry {
        let mut c = Counters::default();
        for _ in 0..orders {
            c.apply_parts(&tally_common::EventType::parse("order"), Some(3));
        }
        SpeedEntry {
            slots: vec![SlotEntry {
                slot: q,
                counters: c.values.to_vec(),
                sketch: customer.map(|id| {
                    let mut s = CustomerSketch::new();
                    s.update(id);
                    s.to_bytes()
                }),
            }],
        }
    }

    #[test]
    fn frames_add_up_and_keep_their_batch_ids() {
        let mut value = entry(0, 2, Some("a")).to_frame(&[1; 8]);
        value.extend(entry(3, 1, Some("b")).to_frame(&[2; 8]));
        value.extend(entry(0, 4, Some("a")).to_frame(&MERGED_ID));
        let f = frames(&value).unwrap();
        assert_eq!(f.iter().map(|f| f.id[0]).collect::<Vec<_>>(), [1, 2, 0]);
        let mut sums = HourSums::default();
        sums.add_value(&value).unwrap();
        assert_eq!(sums.quarters[0].get(Metric::Orders), Some(6));
        assert_eq!(sums.quarters[3].get(Metric::Orders), Some(1));
        assert_eq!(sums.hour_counters().get(Metric::GrossSales), Some(21));
        assert_eq!(sums.unions[0].estimate().estimate, 1);
        // a compaction's frame reads as the frames it replaced
        let merged = sums.to_entry().to_frame(&MERGED_ID);
        assert_eq!(value_counters(&merged).unwrap(), sums.hour_counters());
    }

    #[test]
    fn a_value_cut_short_or_a_bad_slot_is_an_error_not_zero() {
        let value = entry(1, 1, None).to_frame(&[7; 8]);
        for cut in [1, FRAME_HEADER - 1, value.len() - 1] {
            assert!(frames(&value[..cut]).is_err(), "cut at {cut}");
        }
        assert!(value_counters(&entry(4, 1, None).to_frame(&[7; 8])).is_err());
        assert_eq!(value_counters(b"").unwrap(), Counters::default());
    }
}
