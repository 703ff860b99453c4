//! `possync`: the core runtime bundled with the built-in handlers.

mod backend_client;
mod bulk;
mod cli;
mod demo;
mod fields;
mod notices;
mod publish;
mod quarantine;

// Referenced so the linker keeps its plugins' registrations.
#[cfg(feature = "catalog")]
use possync_catalog as _;
#[cfg(feature = "notices")]
use possync_notices as _;
#[cfg(feature = "orders")]
use possync_orders as _;

fn main() -> std::process::ExitCode {
    cli::main()
}
