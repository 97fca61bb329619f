//! The Kythira guest SDK: write a replicated state machine as a plain Rust
//! type and ship it as a WebAssembly component.
//!
//! A plugin implements [`StateMachine`] with its own serde `Command`,
//! `Response`, `Query` and `QueryResponse` types and exports it:
//!
//! ```
//! use kythira_guest::{ApplyContext, StateMachine};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! pub enum Command {
//!     Add(u64),
//!     Reset,
//! }
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Counter {
//!     total: u64,
//! }
//!
//! impl StateMachine for Counter {
//!     type Command = Command;
//!     type Response = u64;
//!     type Query = ();
//!     type QueryResponse = u64;
//!     type Error = String;
//!
//!     fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<u64, String> {
//!         self.total = match command {
//!             Command::Add(n) => self.total.checked_add(n).ok_or("overflow")?,
//!             Command::Reset => 0,
//!         };
//!         Ok(self.total)
//!     }
//!
//!     fn query(&self, (): ()) -> Result<u64, String> {
//!         Ok(self.total)
//!     }
//! }
//!
//! kythira_guest::export!(Counter);
//! ```
//!
//! On `wasm32` targets [`export!`] generates the component exports of the
//! `kythira:state-machine` WIT world; elsewhere it expands to a compile-time
//! check only, so the same crate also builds as a native library whose types
//! and logic hosts, clients and tests use directly (through [`Raw`] and
//! [`testing`]).
//!
//! All bytes crossing the boundary are [`codec`] (postcard) encodings.
//! Clients of the daemon speak JSON instead; the component translates, with
//! serde_json over the same types (see [`StateMachine::command_from_json`]
//! and [`bytes`] for byte strings that read as text).

extern crate self as kythira_guest;

#[cfg(any(test, all(target_arch = "wasm32", feature = "allocator")))]
mod allocator;
pub mod bytes;
pub mod codec;
mod export;
mod key;
mod raw;
mod state_machine;
#[cfg(test)]
mod test_machines;
pub mod testing;

pub use key::{Key, compare as compare_bytes};
pub use raw::{BatchLayoutError, BatchOutput, Raw};
pub use state_machine::{ApplyContext, RestoreError, StateMachine};

/// Bindings of the `kythira:state-machine` world; used by [`export!`] only.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "state-machine",
        runtime_path: "kythira_guest::bindings::__rt",
        pub_export_macro: true,
        export_macro_name: "export_state_machine",
        default_bindings_module: "kythira_guest::bindings",
    });

    #[doc(hidden)]
    pub use wit_bindgen::rt as __rt;

    impl From<crate::BatchOutput> for BatchResult {
        fn from(batch: crate::BatchOutput) -> Self {
            Self {
                output_lens: batch.output_lens,
                errors: batch.errors,
                output: batch.output,
            }
        }
    }

    impl From<ApplyContext> for crate::ApplyContext {
        fn from(ctx: ApplyContext) -> Self {
            Self {
                index: ctx.index,
                term: ctx.term,
                timestamp_ms: ctx.timestamp_ms,
            }
        }
    }
}
