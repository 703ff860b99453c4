//! Work outside the database that handlers tie to their writes: run after
//! the commit, or undone when the writes roll back.

use std::panic::AssertUnwindSafe;

use possync_sdk::Effect;

use crate::events;

/// The effects of a transaction's messages, in the order they were added.
#[derive(Default)]
pub(crate) struct Effects {
    after_commit: Vec<Effect>,
    on_rollback: Vec<Effect>,
    /// Where the current message's effects begin.
    mark: (usize, usize),
}

impl std::fmt::Debug for Effects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effects")
            .field("after_commit", &self.after_commit.len())
            .field("on_rollback", &self.on_rollback.len())
            .finish()
    }
}

impl Effects {
    pub(crate) fn after_commit(&mut self, effect: Effect) {
        self.after_commit.push(effect);
    }

    pub(crate) fn on_rollback(&mut self, effect: Effect) {
        self.on_rollback.push(effect);
    }

    /// A message begins: what it adds from here on can be undone alone.
    pub(crate) fn begin_message(&mut self) {
        self.mark = (self.after_commit.len(), self.on_rollback.len());
    }

    /// The current message's writes were rolled back: forget its commit
    /// effects and undo what it did ahead of the commit.
    pub(crate) fn roll_back_message(&mut self) {
        self.after_commit.truncate(self.mark.0);
        let undo = self.on_rollback.split_off(self.mark.1);
        run_all(undo.into_iter().rev());
    }

    /// Everything committed.
    pub(crate) fn committed(&mut self) {
        self.on_rollback.clear();
        run_all(std::mem::take(&mut self.after_commit).into_iter());
    }

    /// Everything rolled back.
    pub(crate) fn rolled_back(&mut self) {
        self.after_commit.clear();
        run_all(std::mem::take(&mut self.on_rollback).into_iter().rev());
    }
}

/// Runs each effect; one that panics is logged and the rest still run.
fn run_all(effects: impl Iterator<Item = Effect>) {
    for effect in effects {
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(effect)) {
            events::effect_panicked(&possync_sdk::__host::panic_message(panic.as_ref()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn recorder() -> (
        Arc<Mutex<Vec<&'static str>>>,
        impl Fn(&'static str) -> Effect,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let make = {
            let log = Arc::clone(&log);
            move |name: &'static str| -> Effect {
                let log = Arc::clone(&log);
                Box::new(move || log.lock().expect("log").push(name))
            }
        };
        (log, make)
    }

    #[test]
    fn a_commit_runs_commit_effects_in_order_and_drops_the_undo() {
        let (log, effect) = recorder();
        let mut effects = Effects::default();
        effects.begin_message();
        effects.after_commit(effect("remove old-1"));
        effects.on_rollback(effect("remove new-1"));
        effects.begin_message();
        effects.after_commit(effect("remove old-2"));
        effects.committed();
        assert_eq!(*log.lock().expect("log"), ["remove old-1", "remove old-2"]);
    }

    #[test]
    fn a_rollback_undoes_in_reverse_and_never_runs_commit_effects() {
        let (log, effect) = recorder();
        let mut effects = Effects::default();
        effects.on_rollback(effect("remove new-1"));
        effects.after_commit(effect("remove old-1"));
        effects.on_rollback(effect("remove new-2"));
        effects.rolled_back();
        effects.committed();
        assert_eq!(*log.lock().expect("log"), ["remove new-2", "remove new-1"]);
    }

    #[test]
    fn rolling_back_one_message_touches_only_its_own_effects() {
        let (log, effect) = recorder();
        let mut effects = Effects::default();
        effects.begin_message();
        effects.after_commit(effect("kept commit"));
        effects.on_rollback(effect("kept undo"));
        effects.begin_message();
        effects.after_commit(effect("dropped commit"));
        effects.on_rollback(effect("undone"));
        effects.roll_back_message();
        assert_eq!(*log.lock().expect("log"), ["undone"]);
        effects.committed();
        assert_eq!(*log.lock().expect("log"), ["undone", "kept commit"]);
    }

    #[test]
    fn a_panicking_effect_does_not_stop_the_others() {
        let (log, effect) = recorder();
        let mut effects = Effects::default();
        effects.after_commit(Box::new(|| panic!("plugin bug")));
        effects.after_commit(effect("still runs"));
        effects.committed();
        assert_eq!(*log.lock().expect("log"), ["still runs"]);
    }
}
