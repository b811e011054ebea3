//! The speed view as the serving layer sees it: a read of one merchant's hours
//! and a ping. Defined here, not taken from `tally-speed-layer`, so the layers stay
//! independent; the binary adapts its speed store to [`SpeedSource`].

use std::future::Future;

use futures::future::BoxFuture;
use tally_common::metrics::SpeedReading;
use tally_common::Result;

/// A source of speed-view readings (Redis or the embedded store, behind the binary's adapter).
pub trait SpeedSource: Send + Sync + 'static {
    /// Read `hours` (epoch-µs hour starts) of `merchant`, plus the distinct-customer
    /// union estimate of each group of indices into `hours`.
    fn read(
        &self,
        merchant: &str,
        hours: &[i64],
        unions: &[Vec<usize>],
    ) -> impl Future<Output = Result<SpeedReading>> + Send;

    /// Whether the store answers (for `/ready`).
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The object-safe form of [`SpeedSource`] the application state holds, so the
/// router is not generic over the store.
pub(crate) trait DynSpeedSource: Send + Sync {
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>>;

    fn ping(&self) -> BoxFuture<'_, Result<()>>;
}

impl<T: SpeedSource> DynSpeedSource for T {
    fn read<'a>(
        &'a self,
        merchant: &'a str,
        hours: &'a [i64],
        unions: &'a [Vec<usize>],
    ) -> BoxFuture<'a, Result<SpeedReading>> {
        Box::pin(SpeedSource::read(self, merchant, hours, unions))
    }

    fn ping(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(SpeedSource::ping(self))
    }
}
