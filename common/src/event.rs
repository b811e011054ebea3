//! The event model: what one accepted line of a record means.

use serde::{Deserialize, Serialize};

/// The kind of an event. Kinds tally does not know yet are kept (in `raw_events`)
/// but feed no metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A placed order; `amount` is required.
    Order,
    /// A refund; `amount` is required.
    Refund,
    /// A storefront page view.
    PageView,
    /// Any other `type` value, kept verbatim.
    Other(String),
}

impl EventType {
    /// The wire name of the type, as in the `type` field and the `event_type` column.
    pub fn as_str(&self) -> &str {
        match self {
            EventType::Order => "order",
            EventType::Refund => "refund",
            EventType::PageView => "page_view",
            EventType::Other(s) => s,
        }
    }

    /// Parse a wire name; unknown names become [`EventType::Other`].
    pub fn parse(s: &str) -> Self {
        match s {
            "order" => EventType::Order,
            "refund" => EventType::Refund,
            "page_view" => EventType::PageView,
            other => EventType::Other(other.to_string()),
        }
    }

    /// Whether events of this type must carry an `amount`.
    pub fn requires_amount(&self) -> bool {
        matches!(self, EventType::Order | EventType::Refund)
    }
}

/// One accepted event, validated, with its place in the record it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Producer-chosen id, unique per event, reused on retries (1–128 chars).
    pub event_id: String,
    /// The merchant the event belongs to (1–64 chars of `[A-Za-z0-9_.:-]`).
    pub merchant_id: String,
    /// The event's kind.
    pub event_type: EventType,
    /// Event time, epoch microseconds UTC.
    pub ts: i64,
    /// Amount in minor currency units (0 ..= 10^12); present for orders and refunds.
    pub amount: Option<i64>,
    /// The customer, when known (1–128 chars).
    pub customer_id: Option<String>,
    /// 1-based line number inside the (decompressed) record.
    pub line: u32,
    /// Byte range of the original line inside the decoded record's text.
    pub span: (usize, usize),
}
