//! The speed view as its readers see it: one merchant's hours (counters and
//! distinct customers) newer than the batch watermark, and whether the view can
//! vouch for them.
//!
//! The serving layer holds a [`SpeedView`] and knows nothing else of the speed
//! layer; the speed layer's stores (Redis and the embedded store) implement it,
//! and its `SpeedStore` adds the write side (applying batches, consumer
//! checkpoints). Defined here so neither layer depends on the other.

use std::future::Future;
use std::pin::Pin;

use crate::metrics::{BucketRow, MetricValues};
use crate::Result;

/// A boxed, sendable future: what [`SpeedView`]'s methods return, so the trait is
/// object-safe and a reader can hold an `Arc<dyn SpeedView>` without being
/// generic over the store.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Read access to the speed view.
pub trait SpeedView: Send + Sync {
    /// Read `hours` (epoch-µs hour starts) of `merchant`, plus the distinct-customer
    /// union estimate of each group of indices into `hours` (for day buckets).
    /// Fails when the store cannot be reached (after its own bounded retries).
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>>;

    /// Whether the store answers (for `/ready`).
    fn ping(&self) -> BoxFuture<'_, Result<()>>;
}

/// A read of one merchant's speed view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpeedReading {
    /// Per requested hour: counters, and the hour's distinct-customer estimate.
    pub hours: Vec<MetricValues>,
    /// Per requested hour: its four 15-minute slots, each with its counters and
    /// its customers' sketch ([`crate::sketch`]), from which readers make any
    /// zone's buckets and unions.
    pub quarters: Vec<[BucketRow; 4]>,
    /// Per requested group of hours: the distinct-customer estimate of their union.
    pub unions: Vec<i64>,
    /// Indices into the requested hours that the view cannot vouch for: it lost
    /// data that may fall in them (a restart without persistence, a failover to an
    /// empty replica, keys past their TTL) and has not been rebuilt from
    /// `raw_events` yet. Their counters may be short, so they must never be
    /// answered as if true. Empty: every hour is whole.
    pub not_covered: Vec<usize>,
}

impl SpeedReading {
    /// Whether requested hour `i` is whole in the view.
    pub fn covers(&self, i: usize) -> bool {
        !self.not_covered.contains(&i)
    }
}
