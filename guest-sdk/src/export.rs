//! The [`export!`](crate::export) macro.

/// Exports a [`StateMachine`](crate::StateMachine) as the plugin's component.
///
/// Invoke it once, at the root of a `cdylib` plugin crate:
///
/// ```ignore
/// kythira_guest::export!(Counter);
/// ```
///
/// On `wasm32` targets this generates the exports of the
/// `kythira:state-machine` world, backed by one instance of the type created
/// with `Default`; the JSON translations call the type's
/// [`StateMachine`](crate::StateMachine) translation functions (serde_json
/// over its own types unless it overrides them) and never touch that
/// instance. On every other target it only checks that the type is a
/// `StateMachine`, so the crate still builds and tests natively.
#[cfg(target_arch = "wasm32")]
#[macro_export]
macro_rules! export {
    ($machine:ty) => {
        const _: () = {
            struct KythiraExport;

            // A component instance is single-threaded and its exports are never
            // re-entered, so the cell is never contended.
            ::std::thread_local! {
                static MACHINE: ::core::cell::RefCell<$crate::Raw<$machine>> =
                    ::core::cell::RefCell::new($crate::Raw::new());
            }

            impl $crate::bindings::Guest for KythiraExport {
                fn apply(
                    ctx: $crate::bindings::ApplyContext,
                    command: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    let ctx = $crate::ApplyContext::from(ctx);
                    MACHINE.with_borrow_mut(|machine| machine.apply(&ctx, &command))
                }

                fn apply_batch(
                    contexts: ::std::vec::Vec<u64>,
                    command_lens: ::std::vec::Vec<u32>,
                    commands: ::std::vec::Vec<u8>,
                ) -> $crate::bindings::BatchResult {
                    MACHINE
                        .with_borrow_mut(|machine| {
                            machine.apply_batch(&contexts, &command_lens, &commands)
                        })
                        .map(::core::convert::Into::into)
                        // A host that lays out a batch wrongly is broken; trap.
                        .unwrap_or_else(|error| ::core::panic!("{error}"))
                }

                fn query(
                    request: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    MACHINE.with_borrow(|machine| machine.query(&request))
                }

                fn get_state() -> ::std::vec::Vec<u8> {
                    // The WIT signature has no error case: a state that cannot be
                    // encoded is a plugin bug, and trapping reports it to the host
                    // identically on every replica.
                    MACHINE.with_borrow(|machine| match machine.get_state() {
                        ::core::result::Result::Ok(bytes) => bytes,
                        ::core::result::Result::Err(error) => {
                            ::core::panic!("state cannot be encoded: {error}")
                        }
                    })
                }

                fn restore_from_snapshot(
                    state: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    MACHINE.with_borrow_mut(|machine| machine.restore_from_snapshot(&state))
                }

                // The translations are associated functions of `Raw`: they
                // cannot reach MACHINE, so they are pure by construction.
                fn command_from_json(
                    json: ::std::string::String,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    $crate::Raw::<$machine>::command_from_json(&json)
                }

                fn query_from_json(
                    json: ::std::string::String,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    $crate::Raw::<$machine>::query_from_json(&json)
                }

                fn response_to_json(
                    response: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    $crate::Raw::<$machine>::response_to_json(&response)
                }

                fn query_response_to_json(
                    response: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    $crate::Raw::<$machine>::query_response_to_json(&response)
                }
            }

    $crate::bindings::export_state_machine!(KythiraExport with_types_in $crate::bindings);
        };
    };
}

/// Exports a [`StateMachine`](crate::StateMachine) as the plugin's component.
///
/// This is the native expansion: it only checks that the type is a
/// `StateMachine`, so plugin crates build as ordinary libraries whose types and
/// logic hosts, clients and tests can use directly.
#[cfg(not(target_arch = "wasm32"))]
#[macro_export]
macro_rules! export {
    ($machine:ty) => {
        const _: () = {
            const fn assert_state_machine<T: $crate::StateMachine>() {}
            assert_state_machine::<$machine>();
        };
    };
}
