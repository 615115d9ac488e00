defmodule Mix.Tasks.Compile.CapsidGuestsTest do
  # Builds a tiny guest crate (no dependencies: a couple of seconds) in a
  # scratch project. The full path, with wit-bindgen and a call from Elixir,
  # is test/integration/new_app_test.exs.
  use ExUnit.Case, async: false
  import Capsid.AdoptionHelpers
  import ExUnit.CaptureIO

  alias Mix.Tasks.Compile.CapsidGuests, as: Compiler

  setup do
    dir = tmp_dir!("guests")
    File.mkdir_p!(Path.join([dir, "guest", "tiny", "src"]))

    File.write!(Path.join([dir, "guest", "tiny", "Cargo.toml"]), """
    [package]
    name = "tiny_crate"
    version = "0.1.0"
    edition = "2024"

    [lib]
    crate-type = ["cdylib"]

    [workspace]
    """)

    write_source(dir, 42)
    File.mkdir_p!(Path.join([dir, "wit", "tiny"]))
    File.write!(Path.join([dir, "wit", "tiny", "tiny.wit"]), "package my:tiny;\n")

    # cargo's configuration decides where it builds: the compiler must find
    # the component there, not in guest/tiny/target.
    File.mkdir_p!(Path.join(dir, ".cargo"))
    File.write!(Path.join([dir, ".cargo", "config.toml"]), ~s([build]\ntarget-dir = "elsewhere"\n))

    put_env([
      {"CARGO_TARGET_DIR", nil},
      {"CARGO_BUILD_TARGET_DIR", nil},
      {"CARGO_TERM_QUIET", "true"}
    ])

    %{dir: dir, output: Path.join([dir, "priv", "guests", "tiny.wasm"])}
  end

  defp write_source(dir, answer) do
    File.write!(Path.join([dir, "guest", "tiny", "src", "lib.rs"]), """
    #[unsafe(no_mangle)]
    pub extern "C" fn answer() -> i32 {
        #{answer}
    }
    """)
  end

  defp compile(dir, args \\ []) do
    in_project(:capsid_guests_probe, dir, fn ->
      {result, _out} = with_io(fn -> Compiler.run(args) end)
      result
    end)
  end

  # Sets a file's mtime well past the last build (mtimes have 1 s resolution).
  defp touch_later(path), do: File.touch!(path, System.os_time(:second) + 5)

  test "builds each guest into priv/guests/NAME.wasm, from where cargo's config put it", ctx do
    assert {:ok, []} = compile(ctx.dir)
    assert <<0, "asm", _::binary>> = File.read!(ctx.output)

    assert File.exists?(
             Path.join([ctx.dir, "elsewhere", "wasm32-wasip2", "release", "tiny_crate.wasm"])
           )

    refute File.exists?(Path.join([ctx.dir, "guest", "tiny", "target"]))
  end

  test "runs cargo again only when a guest or the WIT changed", ctx do
    assert {:ok, []} = compile(ctx.dir)
    built = File.read!(ctx.output)
    assert {:noop, []} = compile(ctx.dir)

    write_source(ctx.dir, 43)
    touch_later(Path.join([ctx.dir, "guest", "tiny", "src", "lib.rs"]))
    assert {:ok, []} = compile(ctx.dir)
    assert File.read!(ctx.output) != built
    assert {:noop, []} = compile(ctx.dir)

    touch_later(Path.join([ctx.dir, "wit", "tiny", "tiny.wit"]))
    assert {:ok, []} = compile(ctx.dir)
    assert {:noop, []} = compile(ctx.dir)

    assert {:ok, []} = compile(ctx.dir, ["--force"])

    File.rm!(ctx.output)
    assert {:ok, []} = compile(ctx.dir)
    assert File.exists?(ctx.output)
  end

  test "a removed guest's component is removed", ctx do
    assert {:ok, []} = compile(ctx.dir)
    File.rm_rf!(Path.join([ctx.dir, "guest", "tiny"]))
    assert {:noop, []} = compile(ctx.dir)
    refute File.exists?(ctx.output)
  end

  test "a crate that fails to build is an error diagnostic", ctx do
    File.write!(Path.join([ctx.dir, "guest", "tiny", "src", "lib.rs"]), "this is not rust\n")

    {result, _stderr} = with_io(:stderr, fn -> compile(ctx.dir) end)
    assert {:error, [diagnostic]} = result
    assert diagnostic.message =~ "cargo build failed for guest/tiny"
    assert diagnostic.file == Path.join([ctx.dir, "guest", "tiny", "Cargo.toml"])
  end

  test "without cargo, the components already in priv/guests/ are used", ctx do
    assert {:ok, []} = compile(ctx.dir)
    touch_later(Path.join([ctx.dir, "guest", "tiny", "src", "lib.rs"]))
    put_env([{"PATH", ctx.dir}])

    assert {:noop, []} = compile(ctx.dir)

    File.rm!(ctx.output)
    assert_raise Mix.Error, ~r/cargo not found/, fn -> compile(ctx.dir) end
  end

  test "a missing wasm32-wasip2 target says how to add it", ctx do
    fake = Path.join(ctx.dir, "fake-rustc")
    File.write!(fake, "#!/bin/sh\necho /nonexistent/lib/rustlib/wasm32-wasip2/lib\n")
    File.chmod!(fake, 0o755)
    put_env([{"RUSTC", fake}])

    error = assert_raise Mix.Error, fn -> compile(ctx.dir) end
    assert error.message =~ "wasm32-wasip2 target is not installed"
    assert error.message =~ "rustup target add wasm32-wasip2"
  end
end
