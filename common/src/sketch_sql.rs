//! The distinct-customer sketches in SQL: DataFusion functions with the names
//! and meaning of Spark's (Spark SQL 3.5 `hll_sketch_agg`, `hll_union_agg`,
//! `hll_sketch_estimate`, all on Apache DataSketches HLL sketches), so an
//! analyst's query reads the same here and in Spark.
//!
//! - `hll_sketch_agg(customer_id)`: aggregate, a string column to the sketch
//!   (binary) of its distinct non-null values ([`CustomerSketch`]).
//! - `hll_union_agg(sketch)`: aggregate, the union of sketches (binary; nulls
//!   and empty values skipped).
//! - `hll_sketch_estimate(sketch)`: scalar, the distinct-count estimate
//!   (BIGINT; null for a null sketch).
//!
//! The batch layer builds the metric tables' `customers_sketch` columns with
//! the first two; `tally sql` registers all three.

use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, Int64Array};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Field, FieldRef};
use deltalake::datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use deltalake::datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use deltalake::datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, TypeSignature, Volatility,
};
use deltalake::datafusion::prelude::SessionContext;

use crate::sketch::{CustomerSketch, CustomerUnion};

/// Register the three functions in `ctx`.
pub fn register_sketch_functions(ctx: &SessionContext) {
    ctx.register_udaf(sketch_agg());
    ctx.register_udaf(union_agg());
    ctx.register_udf(ScalarUDF::from(SketchEstimate::new()));
}

/// `hll_sketch_agg`.
pub fn sketch_agg() -> AggregateUDF {
    AggregateUDF::from(SketchAgg {
        name: "hll_sketch_agg",
        input: Input::Values,
        signature: Signature::one_of(
            vec![
                TypeSignature::Exact(vec![DataType::Utf8]),
                TypeSignature::Exact(vec![DataType::Utf8View]),
                TypeSignature::Exact(vec![DataType::LargeUtf8]),
            ],
            Volatility::Immutable,
        ),
    })
}

/// `hll_union_agg`.
pub fn union_agg() -> AggregateUDF {
    AggregateUDF::from(SketchAgg {
        name: "hll_union_agg",
        input: Input::Sketches,
        signature: binary_argument(),
    })
}

/// One argument of any of Arrow's binary types (the stored sketches).
fn binary_argument() -> Signature {
    Signature::one_of(
        [
            DataType::Binary,
            DataType::BinaryView,
            DataType::LargeBinary,
        ]
        .into_iter()
        .map(|t| TypeSignature::Exact(vec![t]))
        .collect(),
        Volatility::Immutable,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Input {
    /// Customer ids.
    Values,
    /// Serialized sketches.
    Sketches,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SketchAgg {
    name: &'static str,
    input: Input,
    signature: Signature,
}

impl AggregateUDFImpl for SketchAgg {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Binary)
    }

    fn accumulator(&self, _acc_args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(SketchAccumulator {
            input: self.input,
            union: CustomerUnion::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}_sketch", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug)]
struct SketchAccumulator {
    input: Input,
    union: CustomerUnion,
}

fn sketches(column: &ArrayRef) -> DfResult<BinaryArray> {
    Ok(cast(column, &DataType::Binary)?.as_binary::<i32>().clone())
}

impl SketchAccumulator {
    fn add_sketches(&mut self, column: &ArrayRef) -> DfResult<()> {
        let column = sketches(column)?;
        for bytes in column.iter().flatten() {
            self.union
                .add_bytes(bytes)
                .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        }
        Ok(())
    }
}

impl Accumulator for SketchAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        match self.input {
            Input::Sketches => self.add_sketches(&values[0]),
            Input::Values => {
                let ids = cast(&values[0], &DataType::Utf8)?;
                for id in ids.as_string::<i32>().iter().flatten() {
                    self.union.update(id);
                }
                Ok(())
            }
        }
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        self.add_sketches(&states[0])
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Binary(
            (!self.union.is_empty()).then(|| self.union.to_bytes()),
        ))
    }

    fn size(&self) -> usize {
        // the union's registers (HLL_8, 4 KiB) dominate
        std::mem::size_of_val(self) + (1 << crate::sketch::LG_K)
    }
}

/// `hll_sketch_estimate`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SketchEstimate {
    signature: Signature,
}

impl SketchEstimate {
    fn new() -> Self {
        SketchEstimate {
            signature: binary_argument(),
        }
    }
}

impl ScalarUDFImpl for SketchEstimate {
    fn name(&self) -> &str {
        "hll_sketch_estimate"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let column = args.args[0].to_array(args.number_rows)?;
        let column = sketches(&column)?;
        let mut out = Vec::with_capacity(column.len());
        for bytes in column.iter() {
            out.push(match bytes {
                None => None,
                Some(b) => {
                    let mut u = CustomerUnion::new();
                    u.add_bytes(b)
                        .map_err(|e| DataFusionError::Execution(e.to_string()))?;
                    Some(u.estimate().estimate)
                }
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Int64Array::from(out))))
    }
}

/// A sketch of `ids`, for tests and for callers outside SQL.
pub fn sketch_of<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut s = CustomerSketch::new();
    for id in ids {
        s.update(id);
    }
    s.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sql_sketches_union_and_estimate() {
        let ctx = SessionContext::new();
        register_sketch_functions(&ctx);
        let df = ctx
            .sql(
                "WITH ids AS (SELECT CAST(column1 AS VARCHAR) AS m, CAST(column2 AS VARCHAR) AS c FROM (VALUES \
                 ('a', 'x'), ('a', 'y'), ('a', 'x'), ('b', 'y'), ('b', 'z'), ('b', NULL))), \
                 s AS (SELECT m, hll_sketch_agg(c) AS sk FROM ids GROUP BY m) \
                 SELECT hll_sketch_estimate(hll_union_agg(sk)) AS n FROM s",
            )
            .await
            .unwrap();
        let batches = df.collect().await.unwrap();
        let n = batches[0]
            .column(0)
            .as_primitive::<deltalake::arrow::datatypes::Int64Type>()
            .value(0);
        assert_eq!(n, 3);
    }
}
