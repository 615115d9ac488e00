defmodule Capsid.BudgetTest do
  @moduledoc """
  Node budgets (`Capsid.Budget`): descriptors, committed memory and
  host-held terms, bounded per instance and per node. What could take the
  whole VM down (descriptor exhaustion) runs in a child VM with a lowered
  `ulimit -n`, so a regression fails this test instead of ending the suite.
  Not async: the budgets are the node's.
  """
  use ExUnit.Case, async: false

  alias Capsid.{Error, Trap}

  doctest Capsid.Budget

  setup_all do
    dir = Path.join(System.tmp_dir!(), "capsid-budget-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    File.write!(Path.join(dir, "f"), "x")
    on_exit(fn -> File.rm_rf(dir) end)
    %{dir: dir, probe: Capsid.Component.load!(Capsid.Guests.path(:probe))}
  end

  defp probe(c, dir, opts \\ []) do
    {:ok, pid} =
      Capsid.Instance.start_link([component: c, wasi: [dirs: [{dir, "/data", :read_only}]]] ++ opts)

    pid
  end

  defp with_budget(key, value, fun) do
    Capsid.Budget.configure([{key, value}])

    try do
      fun.()
    after
      Capsid.Budget.configure([{key, :default}])
    end
  end

  defp attach(event) do
    test = self()
    id = make_ref()
    :telemetry.attach(id, event, fn e, m, meta, _ -> send(test, {:event, e, m, meta}) end, nil)
    on_exit(fn -> :telemetry.detach(id) end)
  end

  describe "descriptors" do
    test "an instance holds at most max_descriptors, and gives them back", %{probe: c, dir: dir} do
      before = Capsid.Budget.info().descriptors.in_use
      attach([:capsid, :resource_limit])
      pid = probe(c, dir, max_descriptors: 5)

      # The preopen is one of the five.
      assert {:ok, {4, error}} = Capsid.call(pid, "hoard-files", ["/data/f", 100])
      assert error != ""
      assert Capsid.Budget.info().descriptors.in_use == before + 5

      assert_receive {:event, [:capsid, :resource_limit], %{limit: _},
                      %{resource: :descriptors, instance: ^pid}},
                     2_000

      # Closed descriptors go back to the instance.
      assert {:ok, 4} = Capsid.call(pid, "release-files", [])
      assert {:ok, {4, _}} = Capsid.call(pid, "hoard-files", ["/data/f", 100])

      # And to the node when the instance stops.
      GenServer.stop(pid)

      Capsid.TestHelpers.wait_until(fn ->
        Capsid.Budget.info().descriptors.in_use <= before
      end)
    end

    test "the default per instance is far below what the node allows", %{probe: c, dir: dir} do
      pid = probe(c, dir)
      assert {:ok, {held, _}} = Capsid.call(pid, "hoard-files", ["/data/f", 10_000])
      assert held == Capsid.Limits.defaults()[:max_descriptors] - 1
      GenServer.stop(pid)
      Capsid.TestHelpers.wait_until(fn -> Capsid.Budget.info().descriptors.in_use == 0 end)
    end

    test "the node budget is shared by every instance", %{probe: c, dir: dir} do
      before = Capsid.Budget.info().descriptors.in_use

      with_budget(:max_descriptors_total, before + 12, fn ->
        [a, b] = for _ <- 1..2, do: probe(c, dir, max_descriptors: 100)
        assert {:ok, {held_a, ""}} = Capsid.call(a, "hoard-files", ["/data/f", 8])
        assert {:ok, {held_b, error}} = Capsid.call(b, "hoard-files", ["/data/f", 100])
        assert held_a == 8
        # Two preopens and eight files of a: b got what was left.
        assert held_b == 2
        assert error != ""
        assert Capsid.Budget.info().descriptors.refused > 0
        Enum.each([a, b], &GenServer.stop/1)
      end)

      Capsid.TestHelpers.wait_until(fn -> Capsid.Budget.info().descriptors.in_use <= before end)
    end

    @tag timeout: 180_000
    test "guests cannot exhaust the VM's descriptors (child VM, ulimit -n 1024)", %{dir: dir} do
      # Three instances each trying for 2,000 descriptors under a 1,024
      # limit: before the budget, the first took them all and the VM could
      # not open a file or load code (it terminated). Then the same with
      # budgets configured far above the limit: the reserve still holds.
      for config <- ["[]", "[max_descriptors_total: 1_000_000]"] do
        script = """
        Application.put_env(:capsid, :cache_dir, #{inspect(dir <> "/cache")})
        for {k, v} <- #{config}, do: Application.put_env(:capsid, k, v)
        {:ok, _} = Application.ensure_all_started(:capsid)
        c = Capsid.Component.load!(#{inspect(Capsid.Guests.path(:probe))})
        held =
          for _ <- 1..3 do
            {:ok, pid} = Capsid.Instance.start_link(component: c, max_descriptors: 10_000,
              wasi: [dirs: [{#{inspect(dir)}, "/data", :read_only}]])
            {:ok, {n, _}} = Capsid.call(pid, "hoard-files", ["/data/f", 2_000])
            n
          end
        file = File.read(#{inspect(Path.join(dir, "f"))})
        {:ok, socket} = :gen_tcp.listen(0, [])
        :gen_tcp.close(socket)
        loaded = Code.ensure_loaded?(Capsid.HTTP.Server)
        fds = length(File.ls!("/proc/self/fd"))
        IO.puts("RESULT " <> inspect({held, file, loaded, fds, Capsid.Budget.info().descriptors}))
        """

        {out, status} =
          System.cmd(
            "sh",
            ["-c", "ulimit -n 1024 && exec \"$0\" -pa \"$1\" -e \"$2\"", elixir(), ebin(), script],
            stderr_to_stdout: true
          )

        assert status == 0, out
        [_, result] = Regex.run(~r/RESULT (.*)/, out)
        {held, file, loaded, fds, budget} = Code.eval_string(result) |> elem(0)
        assert file == {:ok, "x"}
        assert loaded
        assert budget.limit <= 1024 - 64
        # The preopens of the instances that got one count too.
        assert Enum.sum(held) < budget.limit
        assert budget.in_use <= budget.limit
        assert fds < 1024
        assert budget.refused > 0
      end
    end
  end

  defp elixir, do: System.find_executable("elixir")
  defp ebin, do: :code.lib_dir(:capsid) |> Path.join("ebin")

  describe "host-held terms" do
    setup do
      ledger = Capsid.Component.load!(Capsid.Guests.path(:ledger))
      pad = :binary.copy("x", 1_000_000)

      imports = %{
        "capsid:ledger/books#[constructor]ledger" => fn name -> %{name: name, pad: pad} end,
        "capsid:ledger/books#[method]ledger.record" => fn _, _ -> 0 end,
        "capsid:ledger/books#[method]ledger.name" => fn l -> l.name end,
        "capsid:ledger/books#[static]ledger.open" => fn name -> %{name: name, pad: pad} end,
        "capsid:ledger/books#archive" => fn _ -> :ok end,
        "capsid:ledger/books#find" => fn _ -> nil end
      }

      %{ledger: ledger, imports: imports}
    end

    test "an instance's host resource state is bounded by max_host_bytes",
         %{ledger: c, imports: imports} do
      before = Capsid.Budget.info().host_bytes.in_use

      {:ok, pid} =
        Capsid.Instance.start_link(component: c, imports: imports, max_host_bytes: 20_000_000)

      # 1 MB a ledger: 19 fit, the 20th is past the limit.
      assert {:ok, 10} = Capsid.call(pid, "hoard", [10])
      assert Capsid.Budget.info().host_bytes.in_use >= before + 10_000_000

      assert {:error, %Trap{kind: :memory_limit, message: m}} = Capsid.call(pid, "hoard", [20])
      assert m =~ "max_host_bytes"

      # The trap discarded the store and its terms: the node has them back.
      Capsid.TestHelpers.wait_until(fn -> Capsid.Budget.info().host_bytes.in_use <= before end)
      assert {:ok, 5} = Capsid.call(pid, "hoard", [5])
      GenServer.stop(pid)
      Capsid.TestHelpers.wait_until(fn -> Capsid.Budget.info().host_bytes.in_use <= before end)
    end

    test "the node's budget for host-held terms is shared by every instance",
         %{ledger: c, imports: imports} do
      before = Capsid.Budget.info().host_bytes.in_use

      with_budget(:max_host_bytes_total, before + 15_000_000, fn ->
        [a, b] =
          for _ <- 1..2 do
            {:ok, pid} = Capsid.Instance.start_link(component: c, imports: imports)
            pid
          end

        assert {:ok, 10} = Capsid.call(a, "hoard", [10])

        assert {:error, %Error{kind: :resource_limit, message: m}} = Capsid.call(b, "hoard", [10])

        assert m =~ "max_host_bytes_total"
        # a keeps what it has.
        assert {:ok, 10} = Capsid.call(a, "held", [])
        Enum.each([a, b], &GenServer.stop/1)
      end)

      Capsid.TestHelpers.wait_until(fn -> Capsid.Budget.info().host_bytes.in_use <= before end)
    end

    test "kept guest output counts against the node's budget: past it, it is dropped",
         %{probe: c, dir: dir} do
      before = Capsid.Budget.info().host_bytes.in_use

      with_budget(:max_host_bytes_total, before + 100, fn ->
        {:ok, pid} =
          Capsid.Instance.start_link(
            component: c,
            wasi: [dirs: [{dir, "/data", :read_only}], stdout: :capture]
          )

        assert {:ok, nil} = Capsid.call(pid, "say", [String.duplicate("x", 1_000), ""])
        assert %{stdout: out} = Capsid.Instance.info(pid)
        assert out =~ "[capsid: 1000 more bytes dropped]"
        assert Capsid.Budget.info().host_bytes.in_use <= before
        GenServer.stop(pid)
      end)
    end
  end

  describe "memory" do
    test "linear memory of all instances counts against the node's budget" do
      faulty = Capsid.Component.load!(Capsid.Guests.path(:faulty))
      imports = %{"hook" => fn x -> x end}
      before = Capsid.Budget.info().memory.in_use

      with_budget(:max_memory_total, before + 64 * 1024 * 1024, fn ->
        {:ok, a} = Capsid.Instance.start_link(component: faulty, imports: imports)
        {:ok, b} = Capsid.Instance.start_link(component: faulty, imports: imports)
        assert {:ok, 1} = Capsid.call(a, "ok", [0])
        assert {:ok, 1} = Capsid.call(b, "ok", [0])

        # alloc-bomb grows until a limit stops it: the node's comes first.
        assert {:error, %Error{kind: :resource_limit, message: m}} =
                 Capsid.call(a, "alloc-bomb", [])

        assert m =~ "max_memory_total"
        # The other instance still works, and a gets its memory back.
        assert {:ok, 1} = Capsid.call(b, "ok", [0])
        assert {:ok, 1} = Capsid.call(a, "ok", [0])
        Enum.each([a, b], &GenServer.stop/1)
      end)

      Capsid.TestHelpers.wait_until(fn -> Capsid.Budget.info().memory.in_use <= before end)
    end
  end

  describe "dirty conversions" do
    test "at most one less than the VM's dirty schedulers; a killed caller gives its slot back" do
      bulk = Capsid.Component.load!(Capsid.Guests.path(:bulk))
      imports = %{"fetch" => fn _ -> [] end, "send" => fn _ -> 0 end}
      dirty = :erlang.system_info(:dirty_cpu_schedulers_online)
      assert %{limit: limit} = Capsid.info().dirty_conversions
      assert limit == max(1, dirty - 1)
      test = self()

      callers =
        for i <- 1..3 do
          spawn(fn ->
            {:ok, pid} = Capsid.Instance.start(component: bulk, imports: imports)
            result = Capsid.call(pid, "options", [2_000_000], timeout: 60_000)
            send(test, {:done, i, elem(result, 0), length(elem(result, 1))})
          end)
        end

      # Kill one while the conversions run (or wait): its slot is the NIF
      # call's, not the process's.
      Process.sleep(5)
      Process.exit(hd(callers), :kill)

      for i <- 2..3, do: assert_receive({:done, ^i, :ok, 2_000_000}, 60_000)

      Capsid.TestHelpers.wait_until(fn -> Capsid.info().dirty_conversions.in_use == 0 end)
      {:ok, pid} = Capsid.Instance.start_link(component: bulk, imports: imports)
      assert {:ok, list} = Capsid.call(pid, "options", [2_000_000], timeout: 60_000)
      assert length(list) == 2_000_000
    end
  end

  test "configure/1 refuses what it does not know" do
    assert_raise ArgumentError, ~r/unknown node budget :max_files/, fn ->
      Capsid.Budget.configure(max_files: 1)
    end

    assert_raise ArgumentError, ~r/expected a non-negative integer/, fn ->
      Capsid.Budget.configure(max_memory_total: -1)
    end

    limit = Capsid.Budget.info().memory.limit

    for bad <- [[{:max_memory_total, 1} | :tail], %{max_memory_total: 1}, :infinity] do
      assert_raise ArgumentError, ~r/expected a keyword list of node budgets/, fn ->
        Capsid.Budget.configure(bad)
      end
    end

    # The refused calls changed nothing (the improper list's first pair included).
    assert Capsid.Budget.info().memory.limit == limit
  end
end
