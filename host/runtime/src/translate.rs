//! JSON at the edge: the plugin's own translation between the JSON clients
//! write and the bytes its `apply` and `query` take.
//!
//! Only the plugin knows its types, so the runtime asks it: the world's
//! `command-from-json`, `query-from-json`, `response-to-json` and
//! `query-response-to-json` exports. They are pure, so each call runs on a
//! fresh instance of the plugin, made for that call and dropped after it:
//! never on a [`crate::Machine`]'s instance, whose heap must stay the one
//! every replica has, and never on an instance another call has changed, so
//! a translation's answer depends on its input alone. Each call is bounded
//! by the query fuel budget and the memory limit. Translations happen on one
//! node, before a command enters the log or after a response leaves it;
//! they are not replicated.

use std::time::Instant;

use wasmtime::Store;

use crate::bindings::StateMachine;
use crate::machine::{Live, StoreData};
use crate::{CallError, Outcome, Plugin, Runtime};

impl Runtime {
    /// Translates a command written as JSON into the bytes
    /// [`crate::Machine::apply`] takes, with the plugin's `command-from-json`.
    ///
    /// The result is [`CallError::Plugin`] with the plugin's reason when the
    /// JSON is not one of its commands; [`CallError::FuelExhausted`] (the
    /// query budget), [`CallError::MemoryLimit`] or [`CallError::Trap`] when
    /// the plugin misbehaves; [`CallError::Internal`] when no instance could
    /// be made for the call (the pool is full; retry).
    pub fn command_from_json(&self, plugin: &Plugin, json: &str) -> Outcome<Vec<u8>> {
        self.translate(plugin, |store, sm| sm.call_command_from_json(store, json))
    }

    /// Translates a query written as JSON into the bytes
    /// [`crate::Machine::query`] takes, with the plugin's `query-from-json`.
    /// Errors as for [`Runtime::command_from_json`].
    pub fn query_from_json(&self, plugin: &Plugin, json: &str) -> Outcome<Vec<u8>> {
        self.translate(plugin, |store, sm| sm.call_query_from_json(store, json))
    }

    /// Translates a successful response of [`crate::Machine::apply`] (or of
    /// one entry of [`crate::Machine::apply_batch`]) into JSON, with the
    /// plugin's `response-to-json`. The text is checked to be exactly one
    /// JSON value: one that is not is [`CallError::Trap`] (`invalid value
    /// from plugin`). Errors otherwise as for [`Runtime::command_from_json`];
    /// an apply's error is already text and needs no translation.
    pub fn response_to_json(&self, plugin: &Plugin, response: &[u8]) -> Outcome<String> {
        self.translate_to_json(plugin, "response-to-json", |store, sm| {
            sm.call_response_to_json(store, response)
        })
    }

    /// Translates a successful answer of [`crate::Machine::query`] into JSON,
    /// with the plugin's `query-response-to-json`; as
    /// [`Runtime::response_to_json`].
    pub fn query_response_to_json(&self, plugin: &Plugin, response: &[u8]) -> Outcome<String> {
        self.translate_to_json(plugin, "query-response-to-json", |store, sm| {
            sm.call_query_response_to_json(store, response)
        })
    }

    fn translate_to_json(
        &self,
        plugin: &Plugin,
        export: &str,
        f: impl FnOnce(&mut Store<StoreData>, &StateMachine) -> wasmtime::Result<Result<String, String>>,
    ) -> Outcome<String> {
        let mut outcome = self.translate(plugin, f);
        if let Ok(json) = &outcome.result
            && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(json)
        {
            outcome.result = Err(CallError::Trap(format!(
                "invalid value from plugin: {export} returned text that is not one JSON value ({e})"
            )));
        }
        outcome
    }

    /// Runs one translation on a fresh instance of `plugin`, with the query
    /// fuel budget, and drops the instance.
    fn translate<T>(
        &self,
        plugin: &Plugin,
        f: impl FnOnce(&mut Store<StoreData>, &StateMachine) -> wasmtime::Result<Result<T, String>>,
    ) -> Outcome<T> {
        let started = Instant::now();
        let (result, fuel_used) = match self
            .check_plugin(plugin)
            .and_then(|()| Live::new(self, plugin))
        {
            Ok(mut fresh) => fresh.call(self.limits().query_fuel, f),
            Err(e) => (Err(e), 0),
        };
        Outcome {
            result,
            fuel_used,
            duration: started.elapsed(),
        }
    }
}
