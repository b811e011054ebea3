//! Distinct-customer sketches: Apache DataSketches HyperLogLog (HLL).
//!
//! Both views keep, beside each bucket's counters, a sketch of the bucket's
//! `customer_id`s, so that the distinct customers of any union of buckets (a
//! local day, a week, a month, a day straddling the watermark, a range's
//! totals) can be estimated without the raw events: sketches merge, distinct
//! counts do not add up.
//!
//! The format is DataSketches' HLL binary format (the `datasketches` crate),
//! which Apache DataSketches' Java, C++ and Python libraries, Spark's `hll_*`
//! functions, Druid and Pinot read. Values are hashed the way those
//! implementations hash a string: MurmurHash3 x64 128 with seed 9001 over the
//! UTF-8 bytes, so a sketch built here and one built by Spark from the same
//! customers merge into the right answer. Sketches are stored as HLL_4 with
//! `lg_k` 12 (4,096 registers, Spark's default): a relative standard error of
//! about 1.6% (Flajolet et al. 2007; DataSketches' HLL error tables), 2.1 KB
//! at most, and a few bytes per customer while a sketch holds few (its list and
//! set modes, which are exact up to hash collisions).

use datasketches::common::NumStdDev;
use datasketches::hash::value::raw_bytes;
use datasketches::hll::{HllSketch, HllType, HllUnion};

use crate::{Error, Result};

/// log2 of the register count of every stored sketch (Spark's default).
pub const LG_K: u8 = 12;

/// The DataSketches HLL preamble's flags byte, its out-of-order flag, its
/// mode byte and the mode of a sketch of registers (DataSketches' HLL
/// serialization format, shared by its Java, C++ and Python libraries).
const FLAGS_BYTE: usize = 5;
const OUT_OF_ORDER_FLAG: u8 = 16;
const MODE_BYTE: usize = 7;
const CUR_MODE_HLL: u8 = 2;

/// The stored register width.
const STORED_TYPE: HllType = HllType::Hll4;

/// A sketch of one bucket's distinct customers, being built.
#[derive(Debug, Clone)]
pub struct CustomerSketch {
    hll: HllSketch,
}

impl Default for CustomerSketch {
    fn default() -> Self {
        Self::new()
    }
}

impl CustomerSketch {
    /// An empty sketch.
    pub fn new() -> Self {
        CustomerSketch {
            hll: HllSketch::new(LG_K, STORED_TYPE).expect("LG_K is a valid lg_k"),
        }
    }

    /// Count `customer_id` (its UTF-8 bytes, as the other implementations hash strings).
    pub fn update(&mut self, customer_id: &str) {
        self.hll.update(raw_bytes::from_str(customer_id));
    }

    /// Whether no customer was counted.
    pub fn is_empty(&self) -> bool {
        self.hll.is_empty()
    }

    /// The DataSketches HLL binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.hll.serialize()
    }

    /// The estimate of distinct customers.
    pub fn estimate(&self) -> f64 {
        self.hll.estimate()
    }
}

/// An estimate of distinct customers with its 95% bounds (two standard
/// deviations, DataSketches' `lower_bound`/`upper_bound`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistinctEstimate {
    /// The estimate, rounded to the nearest whole customer.
    pub estimate: i64,
    /// The lower bound (rounded down), never below 0.
    pub lower: i64,
    /// The upper bound (rounded up).
    pub upper: i64,
}

/// A union of sketches (and of single customers): the distinct customers of
/// several buckets.
#[derive(Debug, Clone)]
pub struct CustomerUnion {
    union: HllUnion,
}

impl Default for CustomerUnion {
    fn default() -> Self {
        Self::new()
    }
}

impl CustomerUnion {
    /// An empty union.
    pub fn new() -> Self {
        CustomerUnion {
            union: HllUnion::new(LG_K).expect("LG_K is a valid lg_k"),
        }
    }

    /// Add a sketch.
    pub fn add(&mut self, sketch: &CustomerSketch) {
        self.union.update(&sketch.hll);
    }

    /// Add every customer of another union.
    pub fn merge(&mut self, other: &CustomerUnion) {
        self.union.update(&other.union.to_sketch(HllType::Hll8));
    }

    /// Add a serialized sketch ([`CustomerSketch::to_bytes`], or any
    /// DataSketches HLL sketch). An empty slice adds nothing.
    ///
    /// Errors: [`Error::Invalid`] for bytes that are not an HLL sketch.
    pub fn add_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let hll = HllSketch::deserialize(bytes)
            .map_err(|e| Error::invalid(format!("not a DataSketches HLL sketch: {e}")))?;
        self.union.update(&hll);
        Ok(())
    }

    /// Count one customer.
    pub fn update(&mut self, customer_id: &str) {
        self.union.update_value(raw_bytes::from_str(customer_id));
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.union.is_empty()
    }

    /// The union as a stored sketch (HLL_4, [`LG_K`]).
    pub fn to_sketch(&self) -> CustomerSketch {
        CustomerSketch {
            hll: self.union.to_sketch(STORED_TYPE),
        }
    }

    /// The union's serialized form (HLL_4, [`LG_K`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_sketch().to_bytes()
    }

    /// The estimate and its 95% bounds: a function of the union's contents
    /// alone, whatever order sketches were added in.
    ///
    /// In HLL mode the union is read as an out-of-order sketch, so with the
    /// composite estimator (of the registers): the HIP estimator, which
    /// DataSketches keeps while a sketch is updated in order, depends on the
    /// order coupons arrived in, and unions of small (list-mode) sketches add
    /// coupons one by one. In list and set modes the estimate is the coupon
    /// count, order-free already.
    pub fn estimate(&self) -> DistinctEstimate {
        let mut bytes = self.union.to_sketch(HllType::Hll8).serialize();
        if bytes
            .get(MODE_BYTE)
            .is_some_and(|m| m & 0x3 == CUR_MODE_HLL)
        {
            bytes[FLAGS_BYTE] |= OUT_OF_ORDER_FLAG;
        }
        let Ok(hll) = HllSketch::deserialize(&bytes) else {
            // the crate reads what it wrote; never here
            return DistinctEstimate {
                estimate: self.union.composite_estimate().round() as i64,
                lower: 0,
                upper: i64::MAX,
            };
        };
        let e = hll.estimate();
        let lower = hll.lower_bound(NumStdDev::Two);
        let upper = hll.upper_bound(NumStdDev::Two);
        DistinctEstimate {
            estimate: e.round() as i64,
            lower: (lower.floor() as i64).max(0),
            upper: upper.ceil() as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_union_of_overlapping_sketches_counts_each_customer_once() {
        let (mut a, mut b) = (CustomerSketch::new(), CustomerSketch::new());
        for i in 0..600 {
            a.update(&format!("c{i}"));
        }
        for i in 400..1000 {
            b.update(&format!("c{i}"));
        }
        let mut u = CustomerUnion::new();
        u.add_bytes(&a.to_bytes()).unwrap();
        u.add_bytes(&b.to_bytes()).unwrap();
        u.add_bytes(&[]).unwrap();
        let e = u.estimate();
        assert!(e.lower <= 1000 && 1000 <= e.upper, "{e:?}");
        assert!((e.estimate - 1000).abs() <= 40, "{e:?}");
        // merge order does not change the answer
        let mut v = CustomerUnion::new();
        v.add(&b);
        v.add(&a);
        assert_eq!(v.to_bytes(), u.to_bytes());
        assert!(u.add_bytes(b"not a sketch").is_err());
    }

    #[test]
    fn few_customers_are_counted_exactly() {
        let mut s = CustomerSketch::new();
        for c in ["a", "b", "a", "c"] {
            s.update(c);
        }
        let mut u = CustomerUnion::new();
        u.add(&s);
        let e = u.estimate();
        assert_eq!((e.estimate, e.lower <= 3, e.upper >= 3), (3, true, true));
        assert!(s.to_bytes().len() < 40, "{}", s.to_bytes().len());
    }
}
