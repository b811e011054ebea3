//! Parts of a computation: an hour's (or a day's) raw rows split by a stable
//! hash of (merchant, customer) — of (merchant, event id) for events without a
//! customer — into N parts computed independently, whose results add up
//! exactly. Each customer of a merchant falls in one part, so the distinct
//! customers of the parts add up; every copy of an event carries the same
//! customer (copies are identical by contract), so deduplication within a part
//! is deduplication over all; the counters and sums add. The busiest merchant
//! is split like any other, by its customers.
//!
//! [`PART_FUNCTION`] is the SQL function that names a row's part, registered
//! in the batch layer's sessions; the publish step adds the parts' rows up.

use std::hash::Hasher;
use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int64Type};
use deltalake::datafusion::common::Result as DfResult;
use deltalake::datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The SQL function `tally_part(merchant_id, key, n)`: the part (0..n) of a row.
pub const PART_FUNCTION: &str = "tally_part";

/// Raw rows per part when the number of parts is chosen from the Delta log's
/// row counts: small enough for one function's memory bound to compute fast,
/// large enough that a part's fixed costs do not dominate.
pub const ROWS_PER_PART: u64 = 20_000_000;

/// The most parts a computation is split into.
pub const MAX_PARTS: u32 = 1024;

/// How a run splits its computations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Parts per computation; None: from the rows ([`ROWS_PER_PART`]).
    pub count: Option<u32>,
    /// Parts computed side by side.
    pub jobs: usize,
}

impl Default for Parts {
    /// Parts from the rows, one at a time.
    fn default() -> Self {
        Parts {
            count: None,
            jobs: 1,
        }
    }
}

impl Parts {
    /// The number of parts for a computation over `rows` raw rows.
    pub fn for_rows(&self, rows: u64) -> u32 {
        self.count
            .unwrap_or_else(|| u32::try_from(rows.div_ceil(ROWS_PER_PART)).unwrap_or(MAX_PARTS))
            .clamp(1, MAX_PARTS)
    }
}

/// The part of (merchant, key) among `n`: FNV-1a (64 bits) of the merchant's
/// bytes, a 0xFF separator (never in UTF-8) and the key's bytes, modulo `n`.
/// Stable across processes and versions, as parts computed in different
/// functions of one run must agree.
pub fn part_of(merchant: &str, key: &str, n: u64) -> u64 {
    let mut h = Fnv1a::default();
    h.write(merchant.as_bytes());
    h.write(&[0xFF]);
    h.write(key.as_bytes());
    h.finish() % n.max(1)
}

/// 64-bit FNV-1a (Fowler, Noll, Vo).
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// [`PART_FUNCTION`] as a DataFusion function.
pub fn part_udf() -> ScalarUDF {
    ScalarUDF::from(PartUdf {
        signature: Signature::any(3, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PartUdf {
    signature: Signature,
}

impl ScalarUDFImpl for PartUdf {
    fn name(&self) -> &str {
        PART_FUNCTION
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let merchant = cast(&arrays[0], &DataType::Utf8)?;
        let key = cast(&arrays[1], &DataType::Utf8)?;
        let n = cast(&arrays[2], &DataType::Int64)?;
        let (merchant, key) = (merchant.as_string::<i32>(), key.as_string::<i32>());
        let n = n.as_primitive::<Int64Type>();
        let out: Int64Array = (0..merchant.len())
            .map(|i| {
                (!merchant.is_null(i) && !key.is_null(i) && !n.is_null(i)).then(|| {
                    part_of(merchant.value(i), key.value(i), n.value(i).max(1) as u64) as i64
                })
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_stable_and_spread() {
        // a fixed value: parts computed by different processes must agree
        assert_eq!(part_of("m_1", "c_42", 7), part_of("m_1", "c_42", 7));
        assert_eq!(part_of("m_1", "c_42", 1), 0);
        let mut seen = [0u32; 7];
        for c in 0..7_000 {
            seen[part_of("m_1", &format!("c_{c}"), 7) as usize] += 1;
        }
        assert!(seen.iter().all(|&k| (800..1200).contains(&k)), "{seen:?}");
        assert_eq!(Parts::default().for_rows(0), 1);
        assert_eq!(Parts::default().for_rows(ROWS_PER_PART + 1), 2);
        assert_eq!(
            Parts {
                count: Some(7),
                jobs: 2
            }
            .for_rows(1),
            7
        );
    }
}
