//! The distinct-customer sketches as a week or a month uses them: a union of
//! many 15-minute slots' sketches, each customer in one to three slots. On 1,000
//! to 1,000,000 distinct customers the union's estimate must be within the 95%
//! bounds it states about as often as stated (and never far off), and the order
//! the slots are merged in must not change the answer.

use tally_common::sketch::{CustomerSketch, CustomerUnion};

/// xorshift64*: deterministic pseudo-random numbers, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The serialized sketches of `slots` slots holding `customers` distinct
/// customers of trial `seed`.
fn slot_sketches(customers: u64, slots: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut sketches: Vec<CustomerSketch> = (0..slots).map(|_| CustomerSketch::new()).collect();
    for c in 0..customers {
        let id = format!("customer-{seed}-{c}");
        for _ in 0..=(rng.next() % 3) {
            sketches[(rng.next() % slots as u64) as usize].update(&id);
        }
    }
    sketches.iter().map(CustomerSketch::to_bytes).collect()
}

#[test]
fn unions_of_slot_sketches_are_within_their_bounds_and_order_free() {
    let (mut all_within, mut all_trials) = (0, 0);
    // (distinct customers, trials, slots): a month of quarter hours, a week
    for (customers, trials, slots) in [
        (1_000u64, 30u64, 2_976usize),
        (10_000, 20, 2_976),
        (100_000, 10, 672),
        (1_000_000, 3, 672),
    ] {
        let mut within = 0;
        for seed in 0..trials {
            let sketches = slot_sketches(customers, slots, seed + customers);
            let mut forward = CustomerUnion::new();
            for s in &sketches {
                forward.add_bytes(s).unwrap();
            }
            let mut backward = CustomerUnion::new();
            for s in sketches.iter().rev() {
                backward.add_bytes(s).unwrap();
            }
            // interleaved halves, merged union into union
            let (mut odd, mut even) = (CustomerUnion::new(), CustomerUnion::new());
            for (i, s) in sketches.iter().enumerate() {
                if i % 2 == 0 { &mut even } else { &mut odd }
                    .add_bytes(s)
                    .unwrap();
            }
            even.merge(&odd);
            let e = forward.estimate();
            assert_eq!(
                backward.estimate(),
                e,
                "{customers}: merge order changed the answer"
            );
            assert_eq!(
                even.estimate(),
                e,
                "{customers}: merge order changed the answer"
            );
            let n = customers as i64;
            if e.lower <= n && n <= e.upper {
                within += 1;
            }
            let error = (e.estimate - n).abs() as f64 / n as f64;
            assert!(
                error < 0.06,
                "{customers}: estimate {e:?} is {:.1}% off",
                error * 100.0
            );
        }
        println!("{customers} customers: within the 95% bounds in {within} of {trials} trials");
        all_within += within;
        all_trials += trials;
    }
    // 95% bounds: about one trial in twenty outside, counted over every size
    // (a handful of trials of one size say nothing about a rate)
    assert!(
        all_within * 10 >= all_trials * 9,
        "the true count was within the 95% bounds in only {all_within} of {all_trials} trials"
    );
}
