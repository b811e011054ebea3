//! The serving store: the batch view loaded for point reads, so that a request
//! reads no object-store bytes (the serving database of Marz's Lambda
//! architecture; Druid and Pinot keep their segments on query nodes for the same
//! reason). The Delta tables stay the source of truth; the store holds a window of
//! recent UTC dates and the serving layer reads older history from the lake.
//!
//! # Layout
//!
//! The unit is one merchant's **date**: its `metrics_hourly` rows of that UTC date
//! and its `metrics_daily` row of that day, encoded as one [`DayRows`] protobuf
//! message (prost; field numbers below are the format). A load always rewrites
//! whole dates, for every merchant with rows on them, so a merchant without a
//! value for a loaded date had no rows there.
//!
//! Each date has two **slots**. A load writes the dates it (re)computes into the
//! slot readers do not use, then **publishes** a new [`StoreState`] naming, per
//! date, the live slot and the load's **generation** in one atomic write, together
//! with the table versions and the batch watermark it reflects. Readers take the
//! state first and then read only live slots, so a reprocess that rewrites a month
//! changes every date of it at once for readers, and a watermark is never seen
//! ahead of its rows. A value whose generation differs from its date's entry
//! in the state is left from an older load into the same slot: it is read as
//! "no rows" (that merchant had none in the newer load).
//!
//! Generations come from the store ([`ServingStore::next_generation`]) and are
//! never reused, so values a load left behind when it died before publishing
//! never match a later state. One load writes at a time (a lease), and a load
//! waits a guard time after the last publish before it writes slots or drops
//! dates, longer than readers keep a state the store has not confirmed.
//!
//! A store that lost its data (a restart without persistence, a flush) lost its
//! state too; readers then read the lake, and the next load fills the store
//! again. Stores must never evict what a load wrote: the loader refuses a store
//! that may ([`ServingStore::check_retention`]).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bucket::{MICROS_PER_DAY, MICROS_PER_HOUR};
use crate::calendar::SLOT_MICROS;
use crate::metrics::{stored_metric_names, BucketRow, MetricValues, STORED_COUNT};
use crate::speed_view::BoxFuture;
use crate::{Error, Result};

/// The store layout's version: a state of another format is not read.
pub const FORMAT: u32 = 2;

/// Commit metadata of a batch run's commits: the days whose `metrics_daily`
/// rows the run rewrote (`YYYY-MM-DD` strings). A load reloads only these dates
/// for such a commit of `metrics_daily` (every date of the partitions it
/// changed for a commit without it).
pub const DAILY_DAYS_KEY: &str = "tally.daily_days";

/// Where one date's rows are, as of a published state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateEntry {
    /// The load that wrote them ([`StoreState::load`] of that load).
    pub generation: u64,
    /// The live slot, 0 or 1.
    pub slot: u8,
}

/// What readers of a store see at once: published by a load in one atomic write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreState {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// The stored metrics, in the order the rows hold them ([`stored_metric_names`]).
    pub metrics: Vec<String>,
    /// The `metrics_hourly` version the rows and the watermark are from.
    pub hourly_version: Option<i64>,
    /// The `metrics_daily` version the daily rows are from.
    pub daily_version: Option<i64>,
    /// The `metrics_quarter_hourly` version the quarter-hourly rows are from.
    #[serde(default)]
    pub quarter_version: Option<i64>,
    /// The `merchants` version whose time zones the store holds.
    #[serde(default)]
    pub merchants_version: Option<i64>,
    /// The batch watermark W (epoch µs) of `hourly_version`.
    pub watermark: Option<i64>,
    /// The generation of the load that published it
    /// ([`ServingStore::next_generation`]: never reused by the store).
    pub load: u64,
    /// When it was published (epoch µs).
    pub published_at: i64,
    /// The first date (epoch µs, UTC midnight) the store keeps.
    pub window_start: i64,
    /// Values of the dates before this (epoch µs) have been deleted.
    #[serde(default)]
    pub dropped_before: i64,
    /// The dates held, by UTC midnight (epoch µs): every hour of such a date
    /// before the watermark, and its daily row when it has one, is in the store.
    pub dates: BTreeMap<i64, DateEntry>,
}

impl StoreState {
    /// The state of a store whose state this process cannot parse: never read,
    /// replaced whole by the next load (which must still name its `load`).
    pub fn unreadable(load: u64) -> Self {
        StoreState {
            format: 0,
            metrics: Vec::new(),
            hourly_version: None,
            daily_version: None,
            quarter_version: None,
            merchants_version: None,
            watermark: None,
            load,
            published_at: 0,
            window_start: 0,
            dropped_before: 0,
            dates: BTreeMap::new(),
        }
    }

    /// Whether this process can read a store in this state (same format, same
    /// stored metrics in the same order).
    pub fn readable(&self) -> bool {
        self.format == FORMAT
            && self
                .metrics
                .iter()
                .map(String::as_str)
                .eq(stored_metric_names())
    }

    /// The entry of the date holding `t` (epoch µs), when the store has it.
    pub fn date(&self, t: i64) -> Option<DateEntry> {
        self.dates
            .get(&crate::bucket::day_floor(t))
            .copied()
            .filter(|_| t >= self.window_start)
    }

    /// Encode as the store keeps it (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decode what [`StoreState::to_json`] wrote.
    pub fn from_json(s: &[u8]) -> Result<Self> {
        serde_json::from_slice(s)
            .map_err(|e| Error::serving_from("the serving store's state does not parse", e))
    }
}

/// One merchant's rows of one UTC date: the value kept per merchant, date and slot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DayRows {
    /// The load that wrote it.
    #[prost(uint64, tag = "1")]
    pub generation: u64,
    /// `metrics_hourly` rows of the date, any order.
    #[prost(message, repeated, tag = "2")]
    pub hours: Vec<HourRow>,
    /// The `metrics_daily` row of the day, when it has one.
    #[prost(message, optional, tag = "3")]
    pub daily: Option<StoredRow>,
    /// `metrics_quarter_hourly` rows of the date, any order; their `hour` is
    /// the quarter hour of the day (0 to 95).
    #[prost(message, repeated, tag = "4")]
    pub quarters: Vec<HourRow>,
}

/// One hour's (or quarter hour's) row within a [`DayRows`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct HourRow {
    /// Hour of the day, 0-23 (UTC); for quarter hours, 0-95.
    #[prost(uint32, tag = "1")]
    pub hour: u32,
    /// The stored metrics in [`StoreState::metrics`] order (zigzag varints).
    #[prost(sint64, repeated, tag = "2")]
    pub values: Vec<i64>,
    /// The row's distinct-customer sketch (DataSketches HLL), when it has one.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub sketch: Option<Vec<u8>>,
}

/// A daily row within a [`DayRows`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredRow {
    /// The stored metrics in [`StoreState::metrics`] order (zigzag varints).
    #[prost(sint64, repeated, tag = "1")]
    pub values: Vec<i64>,
    /// The day's distinct-customer sketch, when it has one.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub sketch: Option<Vec<u8>>,
}

impl DayRows {
    /// Encode for the store.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }

    /// Decode a stored value. Errors: the bytes are not a [`DayRows`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        <DayRows as prost::Message>::decode(bytes)
            .map_err(|e| Error::serving_from("a serving-store value does not decode", e))
    }
}

/// A stored [`DayRows`] read in place, for requests: one pass over the
/// protobuf wire format (prost's own primitives) records where each row lies,
/// and a row is decoded only when asked for, its sketch a slice of the value
/// (no copy). Decoding every row of every date with prost allocated a
/// `Vec` per row and per sketch, most of a request's CPU time.
///
/// Reads what [`DayRows::decode`] reads: fields in any order, unknown fields
/// skipped, repeated values packed or not.
#[derive(Debug, Clone)]
pub struct DayRowsView {
    value: Bytes,
    /// The load that wrote it.
    pub generation: u64,
    /// Byte spans of the hourly rows' messages, by hour of the day.
    hours: [(u32, u32); 24],
    /// Byte spans of the quarter-hourly rows' messages, by slot of the day.
    quarters: [(u32, u32); 96],
    /// Byte span of the daily row's message.
    daily: Option<(u32, u32)>,
}

/// A row message decoded in place: its hour, its stored values, and the byte
/// span of its sketch within the value.
type DecodedRow = (u32, [i64; STORED_COUNT], Option<(u32, u32)>);

fn wire_error(e: prost::DecodeError) -> Error {
    Error::serving_from("a serving-store value does not decode", e)
}

impl DayRowsView {
    /// Index `value`. Errors: the bytes are not a [`DayRows`].
    pub fn parse(value: Bytes) -> Result<Self> {
        use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
        let mut view = DayRowsView {
            value,
            generation: 0,
            hours: [(0, 0); 24],
            quarters: [(0, 0); 96],
            daily: None,
        };
        let total = view.value.len();
        let mut buf: &[u8] = &view.value;
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf).map_err(wire_error)?;
            match (tag, wire) {
                (1, WireType::Varint) => {
                    view.generation = decode_varint(&mut buf).map_err(wire_error)?;
                }
                (2..=4, WireType::LengthDelimited) => {
                    let len = decode_varint(&mut buf).map_err(wire_error)? as usize;
                    if len > buf.len() {
                        return Err(Error::serving("a serving-store value is truncated"));
                    }
                    let at = (total - buf.len()) as u32;
                    let span = (at, at + len as u32);
                    buf = &buf[len..];
                    match tag {
                        3 => view.daily = Some(span),
                        _ => {
                            let (hour, _, _) = view.decode_row(span, false)?;
                            let slots: &mut [(u32, u32)] = if tag == 2 {
                                &mut view.hours
                            } else {
                                &mut view.quarters
                            };
                            if let Some(s) = slots.get_mut(hour as usize) {
                                *s = span;
                            }
                        }
                    }
                }
                _ => {
                    skip_field(wire, tag, &mut buf, DecodeContext::default()).map_err(wire_error)?
                }
            }
        }
        Ok(view)
    }

    /// Decode the row message at `span`: its hour (0 when absent), values
    /// and sketch (a span of the value). `stored_row`: a [`StoredRow`]
    /// (values tag 1, sketch tag 2) rather than an [`HourRow`].
    fn decode_row(&self, span: (u32, u32), stored_row: bool) -> Result<DecodedRow> {
        use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
        let (values_tag, sketch_tag) = if stored_row { (1, 2) } else { (2, 3) };
        let (mut hour, mut values, mut n, mut sketch) = (0u32, [0i64; STORED_COUNT], 0, None);
        let mut push = |v: u64| {
            if let Some(s) = values.get_mut(n) {
                // zigzag (sint64)
                *s = ((v >> 1) as i64) ^ -((v & 1) as i64);
            }
            n += 1;
        };
        let end = span.1 as usize;
        let mut buf: &[u8] = self
            .value
            .get(span.0 as usize..end)
            .ok_or_else(|| Error::serving("a serving-store value is truncated"))?;
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf).map_err(wire_error)?;
            if tag == 1 && !stored_row && wire == WireType::Varint {
                hour =
                    u32::try_from(decode_varint(&mut buf).map_err(wire_error)?).unwrap_or(u32::MAX);
            } else if tag == values_tag && wire == WireType::Varint {
                push(decode_varint(&mut buf).map_err(wire_error)?);
            } else if (tag == values_tag || tag == sketch_tag) && wire == WireType::LengthDelimited
            {
                let len = decode_varint(&mut buf).map_err(wire_error)? as usize;
                if len > buf.len() {
                    return Err(Error::serving("a serving-store value is truncated"));
                }
                let (field, rest) = buf.split_at(len);
                if tag == values_tag {
                    let mut packed = field;
                    while !packed.is_empty() {
                        push(decode_varint(&mut packed).map_err(wire_error)?);
                    }
                } else {
                    let at = (end - buf.len()) as u32;
                    sketch = Some((at, at + len as u32));
                }
                buf = rest;
            } else {
                skip_field(wire, tag, &mut buf, DecodeContext::default()).map_err(wire_error)?;
            }
        }
        Ok((hour, values, sketch))
    }

    /// The row message at `span` as a [`BucketRow`].
    fn row(&self, span: (u32, u32), stored_row: bool) -> Result<BucketRow> {
        let (_, stored, sketch) = self.decode_row(span, stored_row)?;
        Ok(BucketRow {
            values: MetricValues::from_stored(stored),
            sketch: sketch.map(|(a, b)| self.value.slice(a as usize..b as usize)),
        })
    }

    /// The hourly rows of date `day` (epoch µs, UTC midnight) with
    /// `start <= hour < end`, into `out` by hour start.
    pub fn hours_into(
        &self,
        day: i64,
        start: i64,
        end: i64,
        out: &mut std::collections::HashMap<i64, BucketRow>,
    ) -> Result<()> {
        self.rows_into(&self.hours, day, MICROS_PER_HOUR, start, end, out)
    }

    /// The quarter-hourly rows of date `day` with `start <= quarter hour < end`,
    /// into `out` by their start.
    pub fn quarters_into(
        &self,
        day: i64,
        start: i64,
        end: i64,
        out: &mut std::collections::HashMap<i64, BucketRow>,
    ) -> Result<()> {
        self.rows_into(&self.quarters, day, SLOT_MICROS, start, end, out)
    }

    fn rows_into(
        &self,
        spans: &[(u32, u32)],
        day: i64,
        step: i64,
        start: i64,
        end: i64,
        out: &mut std::collections::HashMap<i64, BucketRow>,
    ) -> Result<()> {
        let first = ((start - day).max(0) + step - 1) / step;
        let last = ((end - day).min(step * spans.len() as i64) + step - 1) / step;
        for i in first..last {
            let span = spans[i as usize];
            if span != (0, 0) {
                out.insert(day + i * step, self.row(span, false)?);
            }
        }
        Ok(())
    }

    /// The daily row, when the day has one.
    pub fn daily_row(&self) -> Result<Option<BucketRow>> {
        self.daily.map(|span| self.row(span, true)).transpose()
    }
}

/// One value to write: `rows` of `merchant` on date `day` (epoch µs) into `slot`.
#[derive(Debug, Clone)]
pub struct DayWrite {
    /// The merchant.
    pub merchant: String,
    /// UTC midnight of the date (epoch µs).
    pub day: i64,
    /// 0 or 1.
    pub slot: u8,
    /// An encoded [`DayRows`].
    pub value: Vec<u8>,
    /// Other (date, slot) values of the merchant's same UTC month to delete in
    /// the same write: slots no published state reads any more.
    pub clear: Vec<(i64, u8)>,
}

/// The serving store as the loader writes it and the serving layer reads it:
/// Redis (ElastiCache) in production, [`EmbeddedServingStore`] in one process.
pub trait ServingStore: Send + Sync {
    /// The published state; None when the store holds none (never loaded, or lost
    /// its data). Errors: the store cannot be reached or its state does not parse.
    fn state(&self) -> BoxFuture<'_, Result<Option<StoreState>>>;

    /// `merchant`'s values at `days` (pairs of UTC midnight in epoch µs and slot),
    /// in the same order; None where there is none. One round trip.
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        days: &'a [(i64, u8)],
    ) -> BoxFuture<'a, Result<Vec<Option<Bytes>>>>;

    /// Write `values` (replacing what their merchant, date and slot held).
    fn write<'a>(&'a self, values: &'a [DayWrite]) -> BoxFuture<'a, Result<()>>;

    /// Publish `state` if the store's state is still the one of load `expected`
    /// (None: the store has no state). Returns false, writing nothing, when it is
    /// not: another loader published meanwhile, or the store lost its data.
    fn publish<'a>(
        &'a self,
        expected: Option<u64>,
        state: &'a StoreState,
    ) -> BoxFuture<'a, Result<bool>>;

    /// A generation no load of this store was given before (increasing).
    fn next_generation(&self) -> BoxFuture<'_, Result<u64>>;

    /// Take the loaders' lease for `ttl`, or renew it when `holder` has it;
    /// false when another holder has it. One load at a time writes slots.
    fn lease<'a>(
        &'a self,
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Give the lease back, when `holder` has it.
    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Delete every value of the dates before `before` (UTC midnight, epoch µs);
    /// returns how many keys or values went.
    fn drop_before(&self, before: i64) -> BoxFuture<'_, Result<u64>>;

    /// Fail when the store may drop what a load writes (an eviction policy over
    /// all keys): readers would then take a missing value for "no rows".
    fn check_retention(&self) -> BoxFuture<'_, Result<()>>;

    /// `merchant`'s time zone (an IANA name) as the last load or setting
    /// stored it; None when the store holds none (UTC, or not loaded yet).
    fn zone<'a>(&'a self, merchant: &'a str) -> BoxFuture<'a, Result<Option<String>>>;

    /// Store merchants' time zones: (merchant, IANA name, when it was set,
    /// epoch µs). A zone set later than the one given is kept: a load copying
    /// an older version of the table never undoes a newer setting.
    fn set_zones<'a>(&'a self, zones: &'a [(String, String, i64)]) -> BoxFuture<'a, Result<()>>;

    /// The store's size as its server reports it (bytes of memory in use), when known.
    fn memory_used(&self) -> BoxFuture<'_, Result<Option<u64>>>;

    /// What the store is, for logs (no secrets).
    fn describe(&self) -> String;
}

/// A [`ServingStore`] in this process's memory: what `tally serve` uses with no
/// Redis configured (it loads the store itself from the lake). Cheap to clone.
#[derive(Clone, Default)]
pub struct EmbeddedServingStore {
    inner: std::sync::Arc<std::sync::RwLock<Embedded>>,
}

#[derive(Default)]
struct Embedded {
    zones: std::collections::HashMap<String, (String, i64)>,
    state: Option<StoreState>,
    generation: u64,
    lease: Option<(String, std::time::Instant)>,
    /// Values by merchant, then (date, slot).
    values: std::collections::HashMap<String, std::collections::HashMap<(i64, u8), Bytes>>,
    bytes: u64,
}

impl EmbeddedServingStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget everything, state included (as a restarted server without persistence).
    pub fn flush(&self) {
        if let Ok(mut g) = self.inner.write() {
            *g = Embedded::default();
        }
    }

    fn poisoned() -> Error {
        Error::serving("the embedded serving store's lock is poisoned (a thread panicked)")
    }
}

impl ServingStore for EmbeddedServingStore {
    fn state(&self) -> BoxFuture<'_, Result<Option<StoreState>>> {
        let r = self
            .inner
            .read()
            .map(|g| g.state.clone())
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn read<'a>(
        &'a self,
        merchant: &'a str,
        days: &'a [(i64, u8)],
    ) -> BoxFuture<'a, Result<Vec<Option<Bytes>>>> {
        let r = self
            .inner
            .read()
            .map(|g| {
                let values = g.values.get(merchant);
                days.iter()
                    .map(|k| values.and_then(|v| v.get(k)).cloned())
                    .collect()
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn write<'a>(&'a self, values: &'a [DayWrite]) -> BoxFuture<'a, Result<()>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                let g = &mut *g;
                for v in values {
                    let mine = g.values.entry(v.merchant.clone()).or_default();
                    for k in &v.clear {
                        let old = mine.remove(k);
                        g.bytes -= old.map_or(0, |o| o.len() as u64);
                    }
                    g.bytes += v.value.len() as u64;
                    let old = mine.insert((v.day, v.slot), Bytes::from(v.value.clone()));
                    g.bytes -= old.map_or(0, |o| o.len() as u64);
                }
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn publish<'a>(
        &'a self,
        expected: Option<u64>,
        state: &'a StoreState,
    ) -> BoxFuture<'a, Result<bool>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                if g.state.as_ref().map(|s| s.load) != expected {
                    return false;
                }
                g.state = Some(state.clone());
                true
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn next_generation(&self) -> BoxFuture<'_, Result<u64>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                g.generation += 1;
                g.generation
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn lease<'a>(
        &'a self,
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                let now = std::time::Instant::now();
                match &g.lease {
                    Some((h, until)) if h != holder && *until > now => false,
                    _ => {
                        g.lease = Some((holder.to_string(), now + ttl));
                        true
                    }
                }
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn zone<'a>(&'a self, merchant: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        let r = self
            .inner
            .read()
            .map(|g| g.zones.get(merchant).map(|(z, _)| z.clone()))
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn set_zones<'a>(&'a self, zones: &'a [(String, String, i64)]) -> BoxFuture<'a, Result<()>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                for (m, z, at) in zones {
                    if g.zones.get(m).is_none_or(|(_, t)| t <= at) {
                        g.zones.insert(m.clone(), (z.clone(), *at));
                    }
                }
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn release<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                if g.lease.as_ref().is_some_and(|(h, _)| h == holder) {
                    g.lease = None;
                }
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn drop_before(&self, before: i64) -> BoxFuture<'_, Result<u64>> {
        let r = self
            .inner
            .write()
            .map(|mut g| {
                let (mut dropped, mut freed) = (0, 0);
                for mine in g.values.values_mut() {
                    mine.retain(|(d, _), v| {
                        let keep = *d >= before;
                        if !keep {
                            dropped += 1;
                            freed += v.len() as u64;
                        }
                        keep
                    });
                }
                g.values.retain(|_, mine| !mine.is_empty());
                g.bytes -= freed;
                dropped
            })
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn check_retention(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn memory_used(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        let r = self
            .inner
            .read()
            .map(|g| Some(g.bytes))
            .map_err(|_| Self::poisoned());
        Box::pin(async move { r })
    }

    fn describe(&self) -> String {
        "the embedded serving store (in this process)".into()
    }
}

/// The dates `[first, last]` (UTC midnights, epoch µs), one by one.
pub fn dates_between(first: i64, last: i64) -> impl Iterator<Item = i64> {
    std::iter::successors(Some(first), |d| d.checked_add(MICROS_PER_DAY))
        .take_while(move |d| *d <= last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_rows_round_trip_and_keep_hours_in_range() {
        let day = 20_000 * MICROS_PER_DAY;
        let v = |x: i64| {
            let mut s = [0; STORED_COUNT];
            s[0] = x;
            s[STORED_COUNT - 1] = -x;
            s.to_vec()
        };
        let rows = DayRows {
            generation: 7,
            hours: vec![
                HourRow {
                    hour: 3,
                    values: v(5),
                    sketch: None,
                },
                HourRow {
                    hour: 23,
                    values: v(9),
                    sketch: Some(vec![1, 2, 3]),
                },
            ],
            daily: Some(StoredRow {
                values: v(14),
                sketch: None,
            }),
            quarters: vec![HourRow {
                hour: 95,
                values: v(2),
                sketch: Some(vec![4]),
            }],
        };
        let back = DayRows::decode(&rows.encode_to_vec()).unwrap();
        assert_eq!(back, rows);
        let view = DayRowsView::parse(rows.encode_to_vec().into()).unwrap();
        assert_eq!(view.generation, 7);
        let mut out = std::collections::HashMap::new();
        view.hours_into(
            day,
            day + 4 * MICROS_PER_HOUR,
            day + MICROS_PER_DAY,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        let got = &out[&(day + 23 * MICROS_PER_HOUR)];
        let stored = got.values.stored();
        assert_eq!((stored[0], stored[STORED_COUNT - 1]), (9, -9));
        assert_eq!(got.sketch.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(view.daily_row().unwrap().unwrap().values.stored()[0], 14);
        let mut q = std::collections::HashMap::new();
        view.quarters_into(day, day, day + MICROS_PER_DAY, &mut q)
            .unwrap();
        assert_eq!(
            q[&(day + 95 * SLOT_MICROS)].sketch.as_deref(),
            Some(&[4u8][..])
        );
        // a range within the day, off the grain: the hours starting in it
        let mut some = std::collections::HashMap::new();
        view.hours_into(day, day + 1, day + 3 * MICROS_PER_HOUR + 1, &mut some)
            .unwrap();
        assert_eq!(
            some.keys().copied().collect::<Vec<_>>(),
            [day + 3 * MICROS_PER_HOUR]
        );
        assert!(DayRowsView::parse(bytes::Bytes::from_static(b"\xff\xff")).is_err());
        // a row message cut short
        let mut cut = rows.encode_to_vec();
        cut.truncate(cut.len() - 2);
        assert!(DayRowsView::parse(cut.into()).is_err());
        assert!(DayRows::decode(b"\xff\xff").is_err());
    }

    /// Written by hand in another field order, with unpacked values and
    /// unknown fields: the view reads what prost reads.
    #[test]
    fn the_view_reads_any_encoding_prost_reads() {
        use prost::encoding::{encode_key, encode_varint, WireType};
        let day = 20_000 * MICROS_PER_DAY;
        let mut row = Vec::new();
        encode_key(3, WireType::LengthDelimited, &mut row); // sketch first
        encode_varint(2, &mut row);
        row.extend([7, 8]);
        for v in [3i64, -4] {
            encode_key(2, WireType::Varint, &mut row); // unpacked sint64
            encode_varint(((v << 1) ^ (v >> 63)) as u64, &mut row);
        }
        encode_key(9, WireType::SixtyFourBit, &mut row); // unknown
        row.extend([0; 8]);
        encode_key(1, WireType::Varint, &mut row);
        encode_varint(5, &mut row);
        let mut value = Vec::new();
        encode_key(2, WireType::LengthDelimited, &mut value);
        encode_varint(row.len() as u64, &mut value);
        value.extend(&row);
        encode_key(12, WireType::LengthDelimited, &mut value); // unknown
        encode_varint(1, &mut value);
        value.push(0);
        encode_key(1, WireType::Varint, &mut value); // generation last
        encode_varint(42, &mut value);
        let prost = DayRows::decode(&value).unwrap();
        assert_eq!(prost.generation, 42);
        assert_eq!(prost.hours[0].values, [3, -4]);
        let view = DayRowsView::parse(value.into()).unwrap();
        assert_eq!(view.generation, 42);
        let mut out = std::collections::HashMap::new();
        view.hours_into(day, day, day + MICROS_PER_DAY, &mut out)
            .unwrap();
        let r = &out[&(day + 5 * MICROS_PER_HOUR)];
        assert_eq!((r.values.stored()[0], r.values.stored()[1]), (3, -4));
        assert_eq!(r.sketch.as_deref(), Some(&[7u8, 8][..]));
        assert_eq!(view.daily_row().unwrap(), None);
    }

    #[tokio::test]
    async fn a_zone_set_later_is_never_undone_by_an_older_copy() {
        let store = EmbeddedServingStore::new();
        let set = |z: &str, at: i64| vec![("m".to_string(), z.to_string(), at)];
        store.set_zones(&set("Asia/Kolkata", 20)).await.unwrap();
        // a load copying the table as it was before that setting
        store.set_zones(&set("UTC", 10)).await.unwrap();
        assert_eq!(
            store.zone("m").await.unwrap().as_deref(),
            Some("Asia/Kolkata")
        );
        store.set_zones(&set("Europe/London", 30)).await.unwrap();
        assert_eq!(
            store.zone("m").await.unwrap().as_deref(),
            Some("Europe/London")
        );
        assert_eq!(store.zone("n").await.unwrap(), None);
    }

    #[tokio::test]
    async fn embedded_store_publishes_only_on_the_expected_state() {
        let store = EmbeddedServingStore::new();
        let state = StoreState {
            format: FORMAT,
            metrics: stored_metric_names().map(str::to_string).collect(),
            hourly_version: Some(3),
            daily_version: None,
            quarter_version: None,
            merchants_version: None,
            watermark: Some(0),
            load: 1,
            published_at: 0,
            window_start: 0,
            dropped_before: 0,
            dates: BTreeMap::from([(
                0,
                DateEntry {
                    generation: 1,
                    slot: 0,
                },
            )]),
        };
        assert!(state.readable());
        assert!(!store.publish(Some(1), &state).await.unwrap());
        assert!(store.publish(None, &state).await.unwrap());
        assert!(!store.publish(None, &state).await.unwrap());
        let json = state.to_json();
        assert_eq!(StoreState::from_json(json.as_bytes()).unwrap(), state);
        store
            .write(&[DayWrite {
                merchant: "m".into(),
                day: 0,
                slot: 0,
                value: vec![1, 2],
                clear: vec![],
            }])
            .await
            .unwrap();
        assert_eq!(
            store.read("m", &[(0, 0), (0, 1)]).await.unwrap(),
            vec![Some(bytes::Bytes::from(vec![1, 2])), None]
        );
        assert_eq!(store.drop_before(MICROS_PER_DAY).await.unwrap(), 1);
        store.flush();
        assert_eq!(store.state().await.unwrap(), None);
    }
}
