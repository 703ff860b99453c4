use crate::MessageHandler;

/// A handler compiled into the binary, found at startup.
///
/// Created by [`register_handler!`](crate::register_handler); a crate that
/// registers handlers must be linked into the binary (referenced from it),
/// or the linker may drop its registrations.
#[derive(Debug)]
pub struct HandlerRegistration {
    make: fn() -> Box<dyn MessageHandler>,
}

impl HandlerRegistration {
    /// A registration that builds the handler with `make`.
    pub const fn new(make: fn() -> Box<dyn MessageHandler>) -> Self {
        Self { make }
    }

    /// Builds the handler.
    pub fn make(&self) -> Box<dyn MessageHandler> {
        (self.make)()
    }
}

inventory::collect!(HandlerRegistration);

/// Every handler registered in this binary, in no particular order.
pub fn registered_handlers() -> impl Iterator<Item = &'static HandlerRegistration> {
    inventory::iter::<HandlerRegistration>.into_iter()
}

/// Registers a handler compiled into the binary.
///
/// The argument is a function or closure that returns the handler, for
/// example `register_handler!(PriceHandler::default)`.
#[macro_export]
macro_rules! register_handler {
    ($make:expr) => {
        $crate::__private::inventory::submit! {
            $crate::HandlerRegistration::new(|| ::std::boxed::Box::new(($make)()))
        }
    };
}
