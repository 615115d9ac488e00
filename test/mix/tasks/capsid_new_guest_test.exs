defmodule Mix.Tasks.Capsid.New.GuestTest do
  # What the generator writes. That the result builds and runs is
  # test/integration/new_app_test.exs.
  use ExUnit.Case, async: false
  import Capsid.AdoptionHelpers
  import ExUnit.CaptureIO

  alias Mix.Tasks.Capsid.New.Guest

  defp generate(dir, args, config \\ []) do
    in_project(:my_app, dir, config, fn -> capture_io(fn -> Guest.run(args) end) end)
  end

  test "scaffolds a standalone crate, its WIT world and a shared cargo target dir" do
    dir = tmp_dir!("new-guest")
    File.write!(Path.join(dir, ".gitignore"), "/_build\n/deps")
    out = generate(dir, ["image_tools"])

    cargo = File.read!(Path.join(dir, "guest/image_tools/Cargo.toml"))
    assert cargo =~ ~s(name = "image_tools")
    assert cargo =~ ~s(crate-type = ["cdylib"])
    assert cargo =~ ~s(wit-bindgen = "=0.61.1")
    assert cargo =~ ~r/^\[workspace\]$/m
    refute cargo =~ "workspace = true"
    refute cargo =~ "{{"

    lib = File.read!(Path.join(dir, "guest/image_tools/src/lib.rs"))
    assert lib =~ ~s(path: "../../wit/image_tools")
    assert lib =~ ~s(world: "image-tools")
    assert lib =~ ~s|Application.app_dir(:my_app, "priv/guests/image_tools.wasm")|

    wit = File.read!(Path.join(dir, "wit/image_tools/image_tools.wit"))
    assert wit =~ "package my-app:image-tools@0.1.0;"
    assert wit =~ "world image-tools {"
    assert wit =~ "import log: func(message: string);"
    assert wit =~ ~s(imports: %{"log" => fn message -> ... end})

    assert File.read!(Path.join(dir, "guest/image_tools/README.md")) =~ "Add an import"
    assert File.read!(Path.join(dir, "guest/.cargo/config.toml")) =~ ~s(target-dir = "target")
    assert File.read!(Path.join(dir, ".gitignore")) =~ "/deps\n\n# Capsid guests"
    assert out =~ "compilers: [:capsid_guests] ++ Mix.compilers()"
    assert out =~ ~s|Capsid.call(instance, "greet", ["Ada"])|

    # A second guest shares the config and leaves .gitignore alone.
    gitignore = File.read!(Path.join(dir, ".gitignore"))
    out = generate(dir, ["second"], compilers: [:capsid_guests, :elixir, :app])
    assert File.read!(Path.join(dir, ".gitignore")) == gitignore
    refute out =~ "compilers: [:capsid_guests]"
    assert File.exists?(Path.join(dir, "guest/second/src/lib.rs"))
  end

  test "refuses names that are not crate and WIT names, and existing guests" do
    dir = tmp_dir!("new-guest")

    for name <- ["Hello", "2fast", "my-guest", "a__b", "ok_2", "world", "test", ""] do
      assert_raise Mix.Error, ~r/invalid guest name/, fn -> generate(dir, [name]) end
    end

    assert_raise Mix.Error, ~r/Usage: mix capsid.new.guest NAME/, fn -> generate(dir, []) end

    generate(dir, ["hello"])
    assert_raise Mix.Error, ~r/guest\/hello already exists/, fn -> generate(dir, ["hello"]) end
  end
end
