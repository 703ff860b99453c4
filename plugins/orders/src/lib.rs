//! Orders, as the message type `order`, in both directions.
//!
//! Fields the plugin does not know are ignored, as in every message type:
//! the backend keeps an order's payload as the till sent it.
//!
//! **Up**: the POS app writes an order to the terminal's outbox
//! (`INSERT INTO possync_outbox (type, payload) VALUES ('order', ...)`);
//! possync sends it to the back office, whose backend checks it against
//! this plugin's schema, records it once and serves it through
//! `GET /v1/stores/{store}/upstream?type=order`.
//!
//! **Down**: an `order` the back office sends to a store (a web order for
//! the tills to prepare) is applied to the table `orders`, one row per
//! `order_id`; an order sent again with the same id replaces it.

use possync_sdk::{
    Context, Decision, HandlerError, Migration, Payload, Plugin, Settings, Store, TOMBSTONES,
    Version, Versioned,
};
use serde::{Deserialize, Serialize};

/// The payload of `order`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(extend("x-possync-entity" = {"entity": "order", "id": "order_id", "change": "replace"}))]
pub struct Order {
    /// The order's id, unique in its store (the POS app's receipt number,
    /// or a UUID).
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub order_id: String,
    /// What was sold.
    pub lines: Vec<OrderLine>,
    /// What the customer paid, in the store's currency.
    pub total: f64,
    /// The currency (ISO 4217, `EUR`), when the store has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// How it was paid (`cash`, `card`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<String>,
    /// When it was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_at: Option<String>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OrderLine {
    /// The product sold.
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    pub product_id: String,
    /// How many (more than 0; a fraction for goods sold by weight).
    pub quantity: f64,
    /// The price of one, as charged.
    pub unit_price: f64,
}

impl Payload for Order {
    const TYPE: &'static str = "order";

    fn validate(&self) -> Result<(), String> {
        if self.order_id.trim().is_empty() {
            return Err("order_id must not be empty".into());
        }
        if self.lines.is_empty() {
            return Err("an order needs at least one line".into());
        }
        if !self.total.is_finite() || self.total < 0.0 {
            return Err(format!(
                "total {} must be a number of 0 or more",
                self.total
            ));
        }
        for (index, line) in self.lines.iter().enumerate() {
            if !line.quantity.is_finite() || line.quantity <= 0.0 {
                return Err(format!(
                    "line {index}: quantity {} must be more than 0",
                    line.quantity
                ));
            }
            if !line.unit_price.is_finite() || line.unit_price < 0.0 {
                return Err(format!(
                    "line {index}: unit_price {} must be a number of 0 or more",
                    line.unit_price
                ));
            }
        }
        Ok(())
    }
}

/// The orders' table. Released migrations never change; a change of schema
/// is a new one.
pub const MIGRATIONS: &[Migration] = &[
    TOMBSTONES,
    Migration::new(
        "orders/1",
        "CREATE TABLE IF NOT EXISTS orders (
            id           TEXT PRIMARY KEY NOT NULL,
            lines        TEXT NOT NULL,
            total        REAL NOT NULL,
            currency     TEXT,
            payment      TEXT,
            taken_at     TEXT,
            sync_version INTEGER NOT NULL DEFAULT 0
        );",
    ),
];

/// `orders`, by `id`.
const ORDERS: Versioned = Versioned::new("orders", "id");

/// The `orders` plugin.
pub fn orders_plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("orders")
        .describe("orders: up from the tills' outboxes to the back office, down into `orders`")
        .migrations(MIGRATIONS)
        .on::<Order>(apply_order))
}

/// Applies an `order` sent down to `orders`.
pub fn apply_order(
    order: Order,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let version = message.order();
    let decision = ORDERS.decide(store, &order.order_id, version)?;
    if decision == Decision::Stale {
        return Ok(());
    }
    let lines = serde_json::to_string(&order.lines)
        .map_err(|err| HandlerError::permanent(format!("cannot store the lines: {err}")))?;
    store.execute(
        "INSERT INTO orders (id, lines, total, currency, payment, taken_at, sync_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (id) DO UPDATE SET
             lines = excluded.lines,
             total = excluded.total,
             currency = excluded.currency,
             payment = excluded.payment,
             taken_at = excluded.taken_at,
             sync_version = excluded.sync_version",
        &[
            order.order_id.as_str().into(),
            lines.into(),
            order.total.into(),
            order.currency.into(),
            order.payment.into(),
            order.taken_at.into(),
            Version::column(version),
        ],
    )?;
    ORDERS.revive(store, &order.order_id, decision)?;
    Ok(())
}

possync_sdk::register_builtin!(orders_plugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn order(json: serde_json::Value) -> Result<(), String> {
        serde_json::from_value::<Order>(json)
            .map_err(|err| err.to_string())
            .and_then(|order| order.validate())
    }

    #[test]
    fn an_order_needs_lines_and_sensible_numbers() {
        let line = serde_json::json!({"product_id": "P1", "quantity": 2, "unit_price": 1.5});
        assert_eq!(
            order(serde_json::json!({"order_id": "O1", "lines": [line], "total": 3.0})),
            Ok(())
        );
        assert_eq!(
            order(
                serde_json::json!({"order_id": "O1", "lines": [line], "total": 3.0, "customer": "walk-in"})
            ),
            Ok(()),
            "a field the plugin does not know is ignored"
        );
        for (bad, says) in [
            (
                serde_json::json!({"order_id": "O1", "lines": [], "total": 0}),
                "at least one line",
            ),
            (
                serde_json::json!({"order_id": "O1", "lines": [{"product_id": "P1", "quantity": 0, "unit_price": 1}], "total": 0}),
                "quantity",
            ),
            (
                serde_json::json!({"order_id": "O1", "lines": [line], "total": -1}),
                "total",
            ),
        ] {
            let err = order(bad).expect_err("refused");
            assert!(err.contains(says), "{err}");
        }
    }
}
