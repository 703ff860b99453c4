//! `possync`: the core runtime bundled with the built-in handlers.

mod bulk;
mod cli;
mod demo;
mod fields;
mod publish;

// Referenced so the linker keeps their handler registrations.
#[cfg(feature = "category")]
use possync_plugin_category as _;
#[cfg(feature = "price")]
use possync_plugin_price as _;
#[cfg(feature = "product")]
use possync_plugin_product as _;
#[cfg(feature = "product-delete")]
use possync_plugin_product_delete as _;

fn main() -> std::process::ExitCode {
    cli::main()
}
