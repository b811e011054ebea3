//! The API's OpenAPI document, generated from the code: the routes from their
//! handlers' annotations, the bucket schema and the `metrics` parameter from the
//! metric registry, so a new metric shows up in the document by itself, and the
//! metrics endpoint's parameters from the request parser's own rules
//! (`tally_common::query`: patterns, enums, years), so that a client generated
//! from the document, or a schema-driven fuzzer, sends what the server accepts.

use std::borrow::Cow;
use std::sync::OnceLock;

use serde_json::json;
use tally_common::calendar::{Calendar, Unit};
use tally_common::metrics::{Metric, METRICS};
use tally_common::query::{FIRST_YEAR, INSTANT_PATTERN, LAST_YEAR, MERCHANT_ID_PATTERN};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn, ParameterStyle};
use utoipa::openapi::schema::{
    ArrayBuilder, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::Required;
use utoipa::openapi::{KnownFormat, Ref, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use crate::error::{ErrorBody, ErrorDetail};
use crate::http;
use crate::merge::{Bucket, MetricsResponse};

/// The path of the metrics endpoint, as the router and the document spell it.
pub const METRICS_PATH: &str = "/v1/merchants/{merchant_id}/metrics";

/// The path of the settings endpoint.
pub const SETTINGS_PATH: &str = "/v1/merchants/{merchant_id}/settings";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally",
        description = "Time-series metrics of a merchant's own business, merged from the \
            batch view (authoritative, before the batch watermark) and the speed view \
            (seconds behind, from the watermark on)."
    ),
    paths(http::metrics, http::put_settings, http::health, http::ready, http::openapi_json),
    components(schemas(MetricsResponse, Bucket, ErrorBody, ErrorDetail, http::HealthBody, http::ReadyBody, http::SettingsBody)),
    modifiers(&Generated)
)]
struct ApiDoc;

/// Fills in what comes from the registry and the bearer security scheme.
struct Generated;

impl Modify for Generated {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = doc.components.as_mut() {
            // the settings body: a zone of the same list as `tz`, and nothing else
            components.schemas.insert(
                "SettingsBody".to_string(),
                ObjectBuilder::new()
                    .property(
                        "time_zone",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(Calendar::names()))
                            .description(Some(
                                "The merchant's IANA time zone: the calendar of its buckets \
                                 over all its history, from now on.",
                            ))
                            .examples([json!("Asia/Kolkata")]),
                    )
                    .required("time_zone")
                    .additional_properties(Some(
                        utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
                    ))
                    .into(),
            );
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "A JWT, HS256 or RS256 (keys from the JWKS, refreshed every \
                             `TALLY_JWKS_REFRESH_SECS`); `exp` required and `nbf` honoured, \
                             with 30 s of leeway; NumericDates may have fractions. The \
                             `merchant_id` claim must equal the path's, or the `role` claim \
                             be `admin`.",
                        ))
                        .build(),
                ),
            );
        }
        if let Some(op) = doc
            .paths
            .paths
            .get_mut(METRICS_PATH)
            .and_then(|p| p.get.as_mut())
        {
            op.parameters = Some(metrics_parameters());
        }
        if let Some(op) = doc
            .paths
            .paths
            .get_mut(SETTINGS_PATH)
            .and_then(|p| p.put.as_mut())
        {
            op.parameters = Some(vec![merchant_parameter()]);
        }
    }
}

/// The path's merchant id.
fn merchant_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("merchant_id")
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some("The merchant: 1-64 characters of `[A-Za-z0-9_.:-]`."))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(64))
                .pattern(Some(MERCHANT_ID_PATTERN)),
        ))
        .example(Some(json!("m_42")))
        .build()
}

/// The metrics endpoint's parameters, from the rules `tally_common::query`
/// enforces, so that what the document allows is what the parser accepts.
fn metrics_parameters() -> Vec<Parameter> {
    let instant = |name: &str, description: &str, example: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Query)
            .required(Required::True)
            .description(Some(format!(
                "{description} RFC 3339 with a year from {FIRST_YEAR} to {LAST_YEAR}, an upper-case \
                 `T`, and `Z` or a `±hh:mm` offset; a bucket boundary of the granularity in the \
                 time zone (`tz`, else the merchant's): a local clock hour, local midnight (the \
                 first instant of the day where midnight does not exist), a Monday's midnight \
                 for `week`, the first day's for `month`. `to` must be after `from`, by at most \
                 {} hours, {} days, {} weeks or {} months. (Alignment and the range's length \
                 depend on more than one parameter, which a schema cannot say; every other rule \
                 is in the schema.)",
                Unit::Hour.max_buckets(),
                Unit::Day.max_buckets(),
                Unit::Week.max_buckets(),
                Unit::Month.max_buckets(),
            )))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                    .pattern(Some(INSTANT_PATTERN)),
            ))
            .example(Some(json!(example)))
            .build()
    };
    let names: Vec<&str> = METRICS.iter().map(|d| d.name).collect();
    vec![
        merchant_parameter(),
        instant("from", "Range start, inclusive.", "2026-11-23T00:00:00Z"),
        instant("to", "Range end, exclusive.", "2026-11-30T00:00:00Z"),
        ParameterBuilder::new()
            .name("granularity")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some(
                "Bucket size, a calendar unit of the time zone: `hour` (default), `day`, \
                 `week` (ISO, from Monday) or `month`.",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(Unit::ALL.map(|g| g.name())))
                    .default(Some(json!(Unit::Hour.name()))),
            ))
            .build(),
        ParameterBuilder::new()
            .name("metrics")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some(format!(
                "The metrics to return, comma-separated (default: all): {}. A name given \
                 twice counts once; the response keeps API order.",
                names.join(", ")
            )))
            .style(Some(ParameterStyle::Form))
            .explode(Some(false))
            .schema(Some(
                ArrayBuilder::new()
                    .items(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(names.clone())),
                    )
                    .min_items(Some(1)),
            ))
            .build(),
        ParameterBuilder::new()
            .name("tz")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some(
                "IANA time zone of the buckets for this request (default: the merchant's \
                 setting, `UTC` when it has none).",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(Calendar::names())),
            ))
            .example(Some(json!("UTC")))
            .build(),
    ]
}

/// The OpenAPI document (built once).
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

/// What a metric means, for the document. Exhaustive over [`Metric`], so a new
/// metric cannot be added without its description.
fn describe(metric: Metric) -> &'static str {
    match metric {
        Metric::Orders => "Count of `order` events.",
        Metric::GrossSales => "Sum of `amount` over `order` events (minor currency units).",
        Metric::Refunds => "Count of `refund` events.",
        Metric::RefundedAmount => "Sum of `amount` over `refund` events (minor currency units).",
        Metric::PageViews => "Count of `page_view` events.",
        Metric::UniqueCustomers => {
            "Distinct `customer_id` over all event types: exact for a bucket that is one \
             UTC hour or UTC day before the batch watermark; otherwise (local days, weeks, \
             months, speed and mixed buckets, totals) the estimate of a union of Apache \
             DataSketches HLL sketches (relative standard error about 1.6%), with \
             `unique_customers_bounds`. Never a sum of buckets."
        }
        Metric::NetSales => "`gross_sales - refunded_amount`.",
        Metric::AvgOrderValue => "`gross_sales / orders`; null when `orders` is 0.",
        Metric::ConversionRate => "`orders / page_views`; null when `page_views` is 0.",
    }
}

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

fn timestamp(description: &str) -> ObjectBuilder {
    string(description).format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
}

impl PartialSchema for Bucket {
    fn schema() -> RefOr<Schema> {
        let mut o = ObjectBuilder::new()
            .description(Some(
                "One bucket. Only the requested metrics are present. Every metric is null when \
                 the response is `partial` and the bucket's source is `speed` or `mixed`.",
            ))
            .property(
                "start",
                timestamp("Bucket start, with the time zone's offset at that instant."),
            )
            .required("start")
            .property(
                "source",
                string(
                    "`batch` (authoritative tables), `speed` (the speed view), or `mixed` (a \
                     bucket straddling the batch watermark: batch rows before it plus speed \
                     slots after it).",
                )
                .enum_values(Some(["batch", "speed", "mixed"])),
            )
            .required("source");
        for def in &METRICS {
            let ty = if def.is_float {
                Type::Number
            } else {
                Type::Integer
            };
            let format = if def.is_float {
                KnownFormat::Double
            } else {
                KnownFormat::Int64
            };
            o = o.property(
                def.name,
                ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([ty, Type::Null]))
                    .format(Some(SchemaFormat::KnownFormat(format)))
                    .description(Some(describe(def.metric))),
            );
            if def.metric == Metric::UniqueCustomers {
                o = o.property(
                    "unique_customers_bounds",
                    ArrayBuilder::new()
                        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
                        .items(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))),
                        )
                        .min_items(Some(2))
                        .max_items(Some(2))
                        .description(Some(
                            "With `unique_customers` when it is an estimate: its 95% bounds \
                             [lower, upper]; null when it is exact.",
                        )),
                );
            }
        }
        o.into()
    }
}

impl ToSchema for Bucket {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Bucket")
    }
}

impl PartialSchema for MetricsResponse {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property("merchant_id", string("The merchant."))
            .required("merchant_id")
            .property(
                "granularity",
                string("Bucket size.").enum_values(Some(Unit::ALL.map(|g| g.name()))),
            )
            .required("granularity")
            .property("time_zone", string("The IANA time zone of the buckets."))
            .required("time_zone")
            .property("from", timestamp("Range start (inclusive)."))
            .required("from")
            .property("to", timestamp("Range end (exclusive)."))
            .required("to")
            .property(
                "batch_watermark",
                ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                    .description(Some(
                        "Hours before this instant come from the batch tables; null before \
                         the batch layer's first run.",
                    )),
            )
            .required("batch_watermark")
            .property(
                "partial",
                ObjectBuilder::new()
                    .schema_type(Type::Boolean)
                    .description(Some(
                        "True when the speed view could not be read: the `speed` and `mixed` \
                     buckets' metrics are then null. Reads degrade, they do not fail.",
                    )),
            )
            .required("partial")
            .property(
                "totals",
                ObjectBuilder::new().description(Some(
                    "Every requested metric over the whole range (as a bucket without \
                     `start` and `source`): counters summed, ratios from the sums, distinct \
                     customers of the range (never a sum of buckets). Null metrics when the \
                     response is `partial`.",
                )),
            )
            .required("totals")
            .property(
                "buckets",
                ArrayBuilder::new()
                    .items(RefOr::Ref(Ref::from_schema_name("Bucket")))
                    .description(Some(
                        "Every bucket of the range, in order (zeros where nothing happened).",
                    )),
            )
            .required("buckets")
            .into()
    }
}

impl ToSchema for MetricsResponse {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MetricsResponse")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_names_every_metric_and_the_endpoint() {
        let json = serde_json::to_value(document()).unwrap();
        assert!(json["paths"][METRICS_PATH]["get"].is_object());
        let bucket = &json["components"]["schemas"]["Bucket"]["properties"];
        for def in &METRICS {
            assert!(bucket[def.name].is_object(), "{} missing", def.name);
        }
    }
}
