defmodule Capsid.ImportsTest do
  @moduledoc """
  The rules of `:imports` (Capsid.Instance): extra names ignored (or
  refused with `strict_imports: true`), interface functions by short name
  when unique, `{module, function}` and captures, arity checked.
  """
  use ExUnit.Case, async: true

  import Capsid.TestHelpers

  @wat Path.expand("../fixtures/hand/imports.wat", __DIR__)

  # A host module whose functions implement imports.
  defmodule Host do
    def twice(x), do: 2 * x
    def inc(x), do: x + 1
    def seed, do: 100
  end

  setup_all do
    wasm = Path.join(System.tmp_dir!(), "capsid-imports-#{System.unique_integer([:positive])}.wasm")
    {_, 0} = System.cmd(Capsid.Hostile.wat2wasm!(), [@wat, wasm], stderr_to_stdout: true)
    on_exit(fn -> File.rm(wasm) end)
    %{component: Capsid.Component.load!(wasm, cache: false)}
  end

  defp start(c, imports, opts \\ []) do
    Capsid.Instance.start_link([component: c, imports: imports] ++ opts)
  end

  defp full, do: %{"acme:a/math#twice" => &Host.twice/1, "acme:b/math#twice" => &Host.twice/1}

  test "an interface function by its short name when no other import has it", %{component: c} do
    {:ok, pid} = start(c, Map.merge(full(), %{"inc" => &Host.inc/1, "seed" => &Host.seed/0}))
    # inc(a.twice(b.twice(3))) + seed() = 13 + 100
    assert Capsid.call(pid, "run", [3]) == {:ok, 113}
  end

  test "by its full name, with or without the version", %{component: c} do
    for key <- ["acme:c/util@1.2.0#inc", "acme:c/util#inc"] do
      {:ok, pid} = start(c, Map.merge(full(), %{key => &Host.inc/1, "seed" => fn -> 0 end}))
      assert Capsid.call(pid, "run", [1]) == {:ok, 5}, key
    end
  end

  test "an ambiguous short name is an ArgumentError naming both imports", %{component: c} do
    assert_raise ArgumentError,
                 ~r/"twice" is ambiguous.*"acme:a\/math#twice".*"acme:b\/math#twice"/,
                 fn -> start(c, %{"twice" => &Host.twice/1}) end
  end

  test "one import given twice (short and full name) is an ArgumentError", %{component: c} do
    imports = Map.merge(full(), %{"inc" => &Host.inc/1, "acme:c/util#inc" => &Host.inc/1})

    assert_raise ArgumentError, ~r/"acme:c\/util@1.2.0#inc" is given more than once/, fn ->
      start(c, Map.put(imports, "seed", &Host.seed/0))
    end
  end

  test "names the component does not import are ignored; strict_imports refuses them",
       %{component: c} do
    imports =
      Map.merge(full(), %{
        "inc" => &Host.inc/1,
        "seed" => &Host.seed/0,
        "log" => fn _, _ -> :ok end,
        "acme:x/other#thing" => fn -> :ok end
      })

    {:ok, pid} = start(c, imports)
    assert Capsid.call(pid, "run", [0]) == {:ok, 101}

    assert_raise ArgumentError,
                 ~r/unknown import "(log|acme:x\/other#thing)".*strict_imports/,
                 fn ->
                   start(c, imports, strict_imports: true)
                 end

    assert_raise ArgumentError, ~r/:strict_imports: expected a boolean/, fn ->
      start(c, imports, strict_imports: :yes)
    end
  end

  test "{module, function} and captures of named functions", %{component: c} do
    imports = %{
      "acme:a/math#twice" => {Host, :twice},
      "acme:b/math#twice" => {{Host, :twice}, inline: true},
      "inc" => &Host.inc/1,
      "seed" => {Host, :seed}
    }

    {:ok, pid} = start(c, imports)
    assert Capsid.call(pid, "run", [2]) == {:ok, 109}
  end

  test "arity is checked for every form", %{component: c} do
    base = Map.merge(full(), %{"inc" => &Host.inc/1})

    assert_raise ArgumentError,
                 ~r/"seed" takes 0 argument.*Capsid.ImportsTest.Host.inc\/0 is not/,
                 fn ->
                   start(c, Map.put(base, "seed", {Host, :inc}))
                 end

    assert_raise ArgumentError, ~r/"seed" takes 0 argument.*takes 1/, fn ->
      start(c, Map.put(base, "seed", &Host.inc/1))
    end

    assert_raise ArgumentError, ~r/expected a function or \{module, function_name\}/, fn ->
      start(c, Map.put(base, "seed", :nope))
    end
  end

  test "a missing import is still a link error naming it", %{component: c} do
    assert {:error, %Capsid.Error{kind: :link, message: msg}} = start(c, full())
    assert msg =~ "inc"
    assert msg =~ "seed"
  end

  describe "an import whose runner process dies" do
    # `seed` fails as `die` says on its first run, then answers 100; `run(1)`
    # is 4 * 1 + 1 + seed().
    defp dying(c, die) do
      first = :atomics.new(1, [])

      seed = fn ->
        if :atomics.exchange(first, 1, 1) == 0, do: die.()
        100
      end

      {:ok, pid} =
        start(c, %{
          "acme:a/math#twice" => &Host.twice/1,
          "acme:b/math#twice" => &Host.twice/1,
          "inc" => &Host.inc/1,
          "seed" => seed
        })

      pid
    end

    # Two calls from one fresh caller (trapping exits or not), which then
    # reports both results and whatever else reached its mailbox.
    defp from_caller(pid, trap_exit) do
      test = self()

      {caller, ref} =
        spawn_monitor(fn ->
          Process.flag(:trap_exit, trap_exit)
          first = Capsid.call(pid, "run", [1])
          second = Capsid.call(pid, "run", [1])
          Process.sleep(50)
          {:messages, stray} = Process.info(self(), :messages)
          send(test, {:results, first, second, stray})
        end)

      assert_receive {:DOWN, ^ref, :process, ^caller, reason}, 10_000
      assert reason == :normal, "the caller died: #{inspect(reason)}"
      assert_received {:results, first, second, stray}
      {first, second, stray}
    end

    for trap_exit <- [false, true] do
      test "that kills itself: the caller gets an :import_failed trap (trap_exit: #{trap_exit})",
           %{component: c} do
        pid = dying(c, fn -> Process.exit(self(), :kill) end)
        {first, second, stray} = from_caller(pid, unquote(trap_exit))

        assert {:error, %Capsid.Trap{kind: :import_failed, message: message}} = first
        assert message =~ "runner"
        assert message =~ ":killed"
        assert second == {:ok, 105}
        assert stray == []
      end
    end

    test "through a linked Task that raises: the caller gets an :import_failed trap",
         %{component: c} do
      pid = dying(c, fn -> Task.async(fn -> raise "boom in a task" end) |> Task.await() end)

      {{first, second, stray}, _log} = ExUnit.CaptureLog.with_log(fn -> from_caller(pid, false) end)

      assert {:error, %Capsid.Trap{kind: :import_failed, message: message}} = first
      assert message =~ "runner"
      assert message =~ "boom in a task"
      assert second == {:ok, 105}
      assert stray == []
    end
  end

  describe "an import failing with a huge message" do
    for inline <- [false, true] do
      # 50 MB, with a two-byte character across the cut.
      test "gives a trap with its first 4 KiB and how much was left out (inline: #{inline})",
           %{component: c} do
        big = "a" <> String.duplicate("é", 25_000_000)
        seed = fn -> raise big end
        seed = if unquote(inline), do: {seed, inline: true}, else: seed

        {:ok, pid} =
          start(c, %{
            "acme:a/math#twice" => &Host.twice/1,
            "acme:b/math#twice" => &Host.twice/1,
            "inc" => &Host.inc/1,
            "seed" => seed
          })

        assert {:error, %Capsid.Trap{kind: :import_failed, message: message}} =
                 Capsid.call(pid, "run", [1])

        head = "a" <> String.duplicate("é", 2047)
        assert message == head <> "… #{byte_size(big) - byte_size(head)} bytes more"
      end
    end
  end

  test "host_imports/1 lists only what the host must provide" do
    names = toolkit() |> Capsid.Component.host_imports() |> Enum.map(& &1.name)
    assert names == ["log", "get-config"]
    assert length(Capsid.Component.imports(toolkit())) > length(names)
  end
end
