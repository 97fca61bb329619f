//! Host bindings for the `kythira:state-machine` world, generated from `wit/`.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "state-machine",
});
