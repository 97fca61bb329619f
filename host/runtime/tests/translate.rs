//! JSON at the edge: the plugins' own translations, run through the built
//! components on fresh instances.

mod support;

use kythira_guest::codec::{decode, encode};
use kythira_plugin_kv::{Command as Kv, Response};
use kythira_runtime::{ApplyContext, CallError, Limits, Machine, Plugin, Runtime};
use support::{load, runtime, runtime_with, test_limits};

fn ctx(index: u64) -> ApplyContext {
    ApplyContext {
        index,
        term: 1,
        timestamp_ms: 1_700_000_000_000 + index,
    }
}

/// Translates `json`, applies it at `index` and translates the response.
fn apply_json(
    runtime: &Runtime,
    plugin: &Plugin,
    machine: &mut Machine,
    index: u64,
    json: &str,
) -> String {
    let command = runtime
        .command_from_json(plugin, json)
        .result
        .unwrap_or_else(|e| panic!("{json}: {e}"));
    let response = machine.apply(ctx(index), &command).result.expect("apply");
    runtime
        .response_to_json(plugin, &response)
        .result
        .expect("response-to-json")
}

fn query_json(runtime: &Runtime, plugin: &Plugin, machine: &mut Machine, json: &str) -> String {
    let query = runtime
        .query_from_json(plugin, json)
        .result
        .unwrap_or_else(|e| panic!("{json}: {e}"));
    let answer = machine.query(&query).result.expect("query");
    runtime
        .query_response_to_json(plugin, &answer)
        .result
        .expect("query-response-to-json")
}

#[test]
fn kv_commands_and_answers_go_through_json() {
    let runtime = runtime();
    let kv = load(&runtime, "kv");
    let mut machine = runtime.start(&kv).unwrap();

    let put = runtime.command_from_json(&kv, r#"{"put":{"key":"a","value":"1"}}"#);
    assert_eq!(
        put.result,
        Ok(encode(&Kv::Put {
            key: b"a".to_vec(),
            value: b"1".to_vec()
        })
        .unwrap())
    );
    assert!(put.fuel_used > 0 && put.fuel_used < test_limits().query_fuel);

    let response = machine.apply(ctx(1), &put.result.unwrap()).result.unwrap();
    assert_eq!(
        decode::<Response>(&response).unwrap(),
        Response::Value(None)
    );
    assert_eq!(
        runtime.response_to_json(&kv, &response).result.as_deref(),
        Ok(r#"{"value":null}"#)
    );
    let mut json = |index, command| apply_json(&runtime, &kv, &mut machine, index, command);
    assert_eq!(
        json(2, r#"{"put":{"key":"a","value":"2"}}"#),
        r#"{"value":"1"}"#
    );
    assert_eq!(
        json(
            3,
            r#"{"compare_and_swap":{"key":"b","new":{"hex":"00ff"}}}"#
        ),
        r#""swapped""#
    );
    assert_eq!(
        json(
            4,
            r#"{"compare_and_swap":{"key":"b","expected":null,"new":"x"}}"#
        ),
        r#"{"mismatch":{"current":{"hex":"00ff"}}}"#
    );
    assert_eq!(
        query_json(&runtime, &kv, &mut machine, r#"{"get":{"key":"a"}}"#),
        r#"{"value":"2"}"#
    );
    assert_eq!(
        query_json(
            &runtime,
            &kv,
            &mut machine,
            r#"{"scan":{"prefix":"","limit":1}}"#
        ),
        r#"{"entries":{"entries":[{"key":"a","value":"2"}],"more":true}}"#
    );
    assert_eq!(
        apply_json(&runtime, &kv, &mut machine, 5, r#"{"delete":{"key":"a"}}"#),
        r#"{"value":"2"}"#
    );
}

#[test]
fn json_that_does_not_translate_gives_the_plugins_reason() {
    let runtime = runtime();
    let kv = load(&runtime, "kv");
    let refused = |result: Result<Vec<u8>, CallError>, start: &str, part: &str| match result {
        Err(CallError::Plugin(message)) => {
            assert!(
                message.starts_with(start) && message.contains(part),
                "{message}"
            );
        }
        other => panic!("expected the plugin's reason, got {other:?}"),
    };
    refused(
        runtime
            .command_from_json(&kv, r#"{"putt":{"key":"a","value":"1"}}"#)
            .result,
        "invalid command JSON: ",
        "unknown variant `putt`",
    );
    refused(
        runtime
            .command_from_json(&kv, r#"{"put":{"key":"a"}}"#)
            .result,
        "invalid command JSON: ",
        "missing field `value`",
    );
    refused(
        runtime.command_from_json(&kv, "{not json").result,
        "invalid command JSON: ",
        "line 1",
    );
    refused(
        runtime
            .query_from_json(&kv, r#"{"delete":{"key":"a"}}"#)
            .result,
        "invalid query JSON: ",
        "unknown variant `delete`",
    );
    match runtime.response_to_json(&kv, &[0x2a]).result {
        Err(CallError::Plugin(message)) => {
            assert!(message.starts_with("invalid response: "), "{message}")
        }
        other => panic!("expected the plugin's reason, got {other:?}"),
    }
    match runtime.query_response_to_json(&kv, &[0, 0, 7]).result {
        Err(CallError::Plugin(message)) => assert!(message.contains("trailing"), "{message}"),
        other => panic!("expected the plugin's reason, got {other:?}"),
    }
}

#[test]
fn translations_never_touch_a_machine() {
    let runtime = runtime();
    let kv = load(&runtime, "kv");
    let mut machine = runtime.start(&kv).unwrap();
    apply_json(
        &runtime,
        &kv,
        &mut machine,
        1,
        r#"{"put":{"key":"k","value":"v"}}"#,
    );
    let state = machine.get_state().result.unwrap();
    let checkpoint = machine.checkpoint();
    for _ in 0..3 {
        runtime
            .command_from_json(&kv, r#"{"put":{"key":"other","value":"w"}}"#)
            .result
            .unwrap();
        let _ = runtime
            .command_from_json(&kv, "garbage")
            .result
            .unwrap_err();
    }
    assert_eq!(machine.get_state().result.unwrap(), state);
    assert_eq!(machine.checkpoint(), checkpoint);
}

#[test]
fn a_translation_that_loops_is_stopped_by_the_query_budget() {
    let runtime = runtime();
    let looper = load(&runtime, "looper");
    let mut machine = runtime.start(&looper).unwrap();
    let stopped = runtime.command_from_json(&looper, r#""loop""#);
    assert_eq!(
        stopped.result,
        Err(CallError::FuelExhausted {
            budget: test_limits().query_fuel
        })
    );
    assert_eq!(stopped.fuel_used, test_limits().query_fuel);
    // The next translation gets a fresh instance and a full budget, and the
    // machine running the same plugin never saw any of it.
    let increment = runtime
        .command_from_json(&looper, r#""increment""#)
        .result
        .unwrap();
    assert_eq!(increment, [0]);
    let response = machine.apply(ctx(1), &increment).result.unwrap();
    assert_eq!(
        runtime
            .response_to_json(&looper, &response)
            .result
            .as_deref(),
        Ok("1")
    );
}

#[test]
fn a_translation_that_hogs_memory_is_stopped_by_the_memory_limit() {
    let runtime = runtime_with(Limits {
        // Enough fuel to reach the cap: the limit, not fuel, must stop it.
        query_fuel: 2_000_000_000,
        ..test_limits()
    });
    let memhog = load(&runtime, "memhog");
    assert_eq!(
        runtime.command_from_json(&memhog, r#""hog""#).result,
        Err(CallError::MemoryLimit {
            limit: test_limits().memory_bytes
        })
    );
    assert_eq!(
        runtime
            .command_from_json(&memhog, r#""increment""#)
            .result
            .as_deref(),
        Ok(&[0][..])
    );
}

#[test]
fn translations_run_under_the_query_fuel_budget() {
    let runtime = runtime_with(Limits {
        query_fuel: 1,
        ..test_limits()
    });
    let kv = load(&runtime, "kv");
    assert_eq!(
        runtime
            .command_from_json(&kv, r#"{"get":{"key":"a"}}"#)
            .result,
        Err(CallError::FuelExhausted { budget: 1 })
    );
}

#[test]
fn every_example_plugin_speaks_json() {
    let runtime = runtime();
    let counter = load(&runtime, "counter");
    let mut machine = runtime.start(&counter).unwrap();
    assert_eq!(
        apply_json(
            &runtime,
            &counter,
            &mut machine,
            1,
            r#"{"add":{"name":"hits","delta":5}}"#
        ),
        "5"
    );
    assert_eq!(
        query_json(
            &runtime,
            &counter,
            &mut machine,
            r#"{"get":{"name":"hits"}}"#
        ),
        "5"
    );

    let lock = load(&runtime, "lock");
    let mut machine = runtime.start(&lock).unwrap();
    let granted = apply_json(
        &runtime,
        &lock,
        &mut machine,
        7,
        r#"{"acquire":{"name":"db","owner":"a","lease_ms":5000}}"#,
    );
    assert_eq!(
        granted,
        format!(
            r#"{{"granted":{{"owner":"a","expires_at_ms":{},"token":7}}}}"#,
            ctx(7).timestamp_ms + 5000
        )
    );

    // The misbehaving plugins get the SDK's default translation.
    let panicker = load(&runtime, "panicker");
    assert_eq!(
        runtime
            .command_from_json(&panicker, r#""Panic""#)
            .result
            .as_deref(),
        Ok(&[1][..])
    );
}

#[test]
fn translations_run_side_by_side_from_many_threads() {
    let runtime = runtime();
    let kv = load(&runtime, "kv");
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let (runtime, kv) = (&runtime, &kv);
            scope.spawn(move || {
                for i in 0..10 {
                    let json = format!(r#"{{"put":{{"key":"t{thread}","value":"{i}"}}}}"#);
                    // The pool may be momentarily full (then the call is
                    // Internal and retried); every other answer is exact.
                    let bytes = loop {
                        match runtime.command_from_json(kv, &json).result {
                            Err(CallError::Internal(_)) => std::thread::yield_now(),
                            other => break other.unwrap(),
                        }
                    };
                    let expected = Kv::Put {
                        key: format!("t{thread}").into_bytes(),
                        value: i.to_string().into_bytes(),
                    };
                    assert_eq!(decode::<Kv>(&bytes).unwrap(), expected);
                }
            });
        }
    });
}

#[test]
fn a_plugin_of_another_runtime_is_refused() {
    let kv = load(&runtime(), "kv");
    assert!(matches!(
        runtime().command_from_json(&kv, "{}").result,
        Err(CallError::Internal(message)) if message.contains("another runtime")
    ));
}
