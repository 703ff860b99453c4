//! The catalog: possync's four built-in message types and the tables the
//! POS app reads.
//!
//! | plugin | message type | payload |
//! |---|---|---|
//! | `price` | `price_update` | [`PriceUpdate`] |
//! | `product` | `product_update` | [`ProductUpdate`] |
//! | `product_delete` | `product_delete` | [`ProductDelete`] |
//! | `category` | `category_update` | [`CategoryUpdate`] |
//!
//! Each type is a plugin of its own, so that config can switch one off
//! (`[plugins] price = false`); all four share the catalog's tables and
//! migrations. They register as built-ins: a binary that links this crate
//! (`use possync_catalog as _;`) has them.
//!
//! `products(id, name, price, category_id, icon_name, ...)` and
//! `categories(id, name, icon_name, ...)` are a contract with the POS app:
//! their names and meaning do not change. Besides them, each row keeps the
//! version of the change that wrote it (`sync_version`), and a deleted row
//! leaves a tombstone in `possync_tombstones`, so that a late or redelivered
//! update never undoes a newer change or brings a deleted product back.

mod category;
mod price;
mod product;
mod product_delete;
mod tables;

pub use category::{CategoryUpdate, apply_category, category_plugin};
pub use price::{PriceUpdate, apply_price, price_plugin};
pub use product::{ProductUpdate, apply_product, product_plugin};
pub use product_delete::{ProductDelete, apply_product_delete, product_delete_plugin};
pub use tables::MIGRATIONS;

possync_sdk::register_builtin!(price_plugin);
possync_sdk::register_builtin!(product_plugin);
possync_sdk::register_builtin!(product_delete_plugin);
possync_sdk::register_builtin!(category_plugin);
