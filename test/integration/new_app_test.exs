defmodule Capsid.Integration.NewAppTest do
  # The path of docs/using-capsid.md and docs/writing-a-component.md, run in
  # a fresh `mix new` application with Capsid as a path dependency: compile
  # (the NIF only), scaffold a guest, build it with the :capsid_guests
  # compiler, call it, rebuild it after an edit.
  #
  # Capsid is copied first (without its build outputs), so that the
  # dependency's priv/ can be checked for stray guests. Its NIF is built in
  # the target directory of this checkout (found with `cargo metadata`),
  # passed as CARGO_BUILD_TARGET_DIR: only the capsid_nif crate itself is
  # compiled again (its path changed), not wasmtime, and the compiler must
  # find the library where that variable put it.
  use ExUnit.Case, async: false
  import Capsid.AdoptionHelpers, only: [tmp_dir!: 1]

  @moduletag :integration
  @moduletag timeout: 40 * 60_000

  @root Path.expand("../..", __DIR__)
  @skip ~w(.git _build deps target test tmp)

  test "from mix new to calling your own Rust guest" do
    work = tmp_dir!("new-app")
    capsid = Path.join(work, "capsid")
    copy_capsid(capsid)

    env = [
      {"MIX_ENV", "dev"},
      {"CARGO_TARGET_DIR", nil},
      {"CARGO_BUILD_TARGET_DIR", shared_target_dir()},
      {"MIX_BUILD_PATH", nil},
      {"MIX_DEPS_PATH", nil},
      {"MIX_BUILD_ROOT", nil},
      # Capsid's compilation cache, away from the user's.
      {"XDG_CACHE_HOME", Path.join(work, "cache")}
    ]

    {_, timings} = run!(work, env, ["new", "hello_app"], [])
    app = Path.join(work, "hello_app")

    mix_exs = Path.join(app, "mix.exs")

    File.write!(
      mix_exs,
      File.read!(mix_exs)
      |> String.replace(
        "      deps: deps()",
        "      compilers: [:capsid_guests] ++ Mix.compilers(),\n      deps: deps()"
      )
      |> String.replace(
        "  defp deps do\n    [\n",
        "  defp deps do\n    [\n      {:capsid, path: #{inspect(capsid)}},\n"
      )
    )

    {_, timings} = run!(app, env, ["deps.get"], timings)
    {out, timings} = run!(app, env, ["compile"], timings)
    assert out =~ "Building the Capsid NIF"

    {out, timings} = run!(app, env, ["capsid.new.guest", "hello"], timings)
    assert out =~ "creating guest/hello/src/lib.rs"

    {out, timings} = run!(app, env, ["compile"], timings)
    assert out =~ "Building guest hello"

    # The guide's call, in a module: `mix run` runs it, and so does the
    # release below (`-s`, once it booted), which then stops.
    File.write!(Path.join(app, "lib/check.ex"), """
    defmodule HelloApp.Hello do
      use Capsid.Bindings, component: "priv/guests/hello.wasm"
    end

    defmodule HelloApp.Check do
      def run do
        path = Application.app_dir(:hello_app, "priv/guests/hello.wasm")
        {:ok, component} = Capsid.Component.load(path)

        {:ok, instance} =
          Capsid.Instance.start_link(
            component: component,
            imports: %{"log" => fn message -> IO.puts("log: " <> message) end}
          )

        {:ok, greeting} = Capsid.call(instance, "greet", ["Ada"])
        IO.puts("result: " <> greeting)
        # The quick start's generated module gives the same.
        {:ok, ^greeting} = HelloApp.Hello.greet(instance, "Ada")
        IO.puts("bindings: " <> HelloApp.Hello.greet!(instance, "Ada"))
      end

      def in_release do
        {:ok, [[mode]]} = :init.get_argument(:mode)
        IO.puts("mode: \#{mode}")
        run()
        System.stop(0)
      rescue
        e ->
          IO.puts(Exception.format(:error, e, __STACKTRACE__))
          System.stop(1)
      end
    end
    """)

    {out, timings} = run!(app, env, ["run", "-e", "HelloApp.Check.run()"], timings)
    assert out =~ "log: greeting Ada"
    assert out =~ "result: Hello, Ada!"
    assert out =~ "bindings: Hello, Ada!"

    # Nothing changed: cargo does not even run.
    {out, timings} = run!(app, env, ["compile"], timings)
    refute out =~ "Building guest"

    # An edit of the guest's source rebuilds it.
    lib = Path.join(app, "guest/hello/src/lib.rs")

    File.write!(
      lib,
      String.replace(File.read!(lib), ~s|format!("Hello, {name}!")|, ~s|format!("Howdy, {name}!")|)
    )

    File.touch!(lib, System.os_time(:second) + 5)
    {out, timings} = run!(app, env, ["compile"], timings)
    assert out =~ "Building guest hello"
    {out, timings} = run!(app, env, ["run", "-e", "HelloApp.Check.run()"], timings)
    assert out =~ "result: Howdy, Ada!"
    assert out =~ "bindings: Howdy, Ada!"

    # So does an edit of its WIT.
    wit = Path.join(app, "wit/hello/hello.wit")
    File.write!(wit, File.read!(wit) <> "\n// edited\n")
    File.touch!(wit, System.os_time(:second) + 10)
    {out, timings} = run!(app, env, ["compile"], timings)
    assert out =~ "Building guest hello"

    # The dependency built its NIF, and none of Capsid's own guests.
    dep_priv = Path.join(app, "_build/dev/lib/capsid/priv")
    assert File.regular?(Path.join(dep_priv, "native/libcapsid_nif.so"))
    assert Path.wildcard(Path.join(dep_priv, "**/*.wasm")) == []
    assert Path.wildcard(Path.join(capsid, "priv/**/*.wasm")) == []
    # ...in the target directory it was given, not in its own.
    refute File.exists?(Path.join(capsid, "target"))

    assert Path.wildcard(Path.join(app, "priv/guests/*")) == [
             Path.join(app, "priv/guests/hello.wasm")
           ]

    # A release boots in embedded mode: every module, Capsid.Native's
    # @on_load hook included, is loaded while the VM starts.
    {_, timings} =
      run!(app, List.keystore(env, "MIX_ENV", 0, {"MIX_ENV", "prod"}), ["release"], timings)

    release = Path.join(app, "_build/prod/rel/hello_app")
    assert Path.wildcard(Path.join(release, "lib/capsid-*/priv/**/*.wasm")) == []

    {out, status} =
      System.cmd("timeout", ["300", Path.join(release, "bin/hello_app"), "start"],
        env: [
          {"RELEASE_DISTRIBUTION", "none"},
          {"ELIXIR_ERL_OPTIONS", "-s Elixir.HelloApp.Check in_release"} | env
        ],
        stderr_to_stdout: true
      )

    assert {status, out =~ "mode: embedded", out =~ "result: Howdy, Ada!"} ==
             {0, true, true},
           out

    IO.puts(
      :stderr,
      "\nnew-app integration timings: " <>
        Enum.map_join(Enum.reverse(timings), ", ", fn {step, s} -> "#{step} #{s}s" end)
    )
  end

  # Capsid's sources, without what builds produce.
  defp copy_capsid(dest) do
    File.mkdir_p!(dest)

    for entry <- File.ls!(@root), entry not in @skip do
      File.cp_r!(Path.join(@root, entry), Path.join(dest, entry))
    end

    # A Cargo workspace member (the hostile fixtures' tool): cargo needs
    # every member's manifest, even to build only the NIF.
    wat2wasm = "test/fixtures/hostile/wat2wasm"
    File.mkdir_p!(Path.join(dest, Path.dirname(wat2wasm)))
    File.cp_r!(Path.join(@root, wat2wasm), Path.join(dest, wat2wasm))

    File.rm_rf!(Path.join(dest, "priv/native"))
    File.rm_rf!(Path.join(dest, "priv/guests"))
  end

  defp shared_target_dir do
    {json, 0} = System.cmd("cargo", ["metadata", "--format-version", "1", "--no-deps"], cd: @root)
    [_, dir] = Regex.run(~r/"target_directory":"((?:[^"\\]|\\.)*)"/, json)
    String.replace(dir, ~r/\\(.)/, "\\1")
  end

  defp run!(dir, env, args, timings) do
    t0 = System.monotonic_time(:millisecond)
    {out, status} = System.cmd("mix", args, cd: dir, env: env, stderr_to_stdout: true)
    seconds = div(System.monotonic_time(:millisecond) - t0, 1000)

    if status != 0 do
      flunk("mix #{Enum.join(args, " ")} failed (exit status #{status}):\n#{out}")
    end

    {out, [{"mix " <> Enum.join(args, " "), seconds} | timings]}
  end
end
