//! Integration tests of the speed layer (one binary: linking is the slow part).

mod conformance;
mod kinesis;
