//! The `{{world}}` guest component: the Rust side of the world in
//! `wit/{{crate}}/{{crate}}.wit`. `mix compile` builds it into
//! `priv/guests/{{crate}}.wasm`. From Elixir:
//!
//! ```text
//! path = Application.app_dir(:{{app}}, "priv/guests/{{crate}}.wasm")
//! {:ok, component} = Capsid.Component.load(path)
//! {:ok, instance} =
//!   Capsid.Instance.start_link(
//!     component: component,
//!     imports: %{"log" => fn message -> IO.puts(message) end}
//!   )
//! {:ok, "Hello, Ada!"} = Capsid.call(instance, "greet", ["Ada"])
//! ```

// Generates, from the WIT world: the `Guest` trait (one method per export),
// one plain function per import (`log`), and the `export!` macro.
wit_bindgen::generate!({
    path: "../../wit/{{crate}}",
    world: "{{world}}",
});

struct Component;

impl Guest for Component {
    fn greet(name: String) -> String {
        // Calling an import runs the Elixir function given for it in
        // `imports:` (here "log"); its return value comes back here.
        log(&format!("greeting {name}"));
        format!("Hello, {name}!")
    }
}

export!(Component);
