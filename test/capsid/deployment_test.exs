defmodule Capsid.DeploymentTest do
  import Capsid.TestHelpers
  use ExUnit.Case, async: true

  alias Capsid.Error
  require Logger

  @v1 Capsid.Guests.path(:greeter_v1)
  @v2 Capsid.Guests.path(:greeter_v2)
  @bad Capsid.Guests.path(:greeter_bad)
  @hello %{1 => "Hello, Ada!", 2 => "Hi Ada, welcome back!"}
  @stateful Capsid.Guests.path(:stateful)
  @hand Path.expand("../fixtures/hand", __DIR__)

  doctest Capsid, only: [deploy: 3]

  setup context do
    name = :"deploy_#{context.line}_#{System.unique_integer([:positive])}"
    on_exit(fn -> Capsid.undeploy(name) end)
    %{name: name}
  end

  test "deploy, call, versions, upgrade, rollback, undeploy", %{name: name} do
    assert {:ok, %{current: %{version: 1, hash: h1}, previous: nil}} =
             Capsid.deploy(name, @v1, size: 1)

    assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}

    assert {:ok, %{current: %{version: 2, hash: h2}, previous: %{version: 1, hash: ^h1}}} =
             Capsid.deploy(name, @v2)

    assert h1 != h2
    assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hi Ada, welcome back!"}
    assert {:ok, %{current: %{hash: ^h2, loaded_at: %DateTime{}}}} = Capsid.versions(name)

    assert {:ok, %{current: %{hash: ^h1}, previous: %{hash: ^h2}}} = Capsid.rollback(name)
    assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}

    assert Capsid.undeploy(name) == :ok
    # At once again (its name may still be registered for a moment): an
    # error, never an exit.
    assert {:error, %Error{kind: :instance_down}} = Capsid.undeploy(name)
    assert {:error, %Error{kind: :instance_down}} = Capsid.call(name, "hello", ["Ada"])
    assert {:error, %Error{kind: :instance_down}} = Capsid.versions(name)
  end

  test "an incompatible upgrade is refused, naming each mismatch; the old version keeps serving",
       %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    assert {:error, %Error{kind: :incompatible, message: msg}} = Capsid.deploy(name, @bad)
    assert msg =~ "acme:greeter/greet@1.0.0#version changed type: func() -> u32 → func() -> string"
    assert msg =~ "acme:greeter/greet@1.0.0#count is missing"
    assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}
    assert {:ok, %{current: %{version: 1}}} = Capsid.versions(name)

    # force: true deploys it anyway.
    assert {:ok, %{current: %{version: 2}}} = Capsid.deploy(name, @bad, force: true)
    assert Capsid.call(name, "version", []) == {:ok, "three"}
  end

  test "a component that fails to compile or link never disturbs the running version", %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    {:ok, 1} = Capsid.call(name, "count", [])

    assert {:error, %Error{kind: :invalid_component}} =
             Capsid.deploy(name, <<0, "asm", 1, 0, 0, 0>>)

    assert {:error, %Error{kind: :file_error}} = Capsid.deploy(name, "/no/such/file.wasm")

    # The toolkit needs imports this deployment does not provide: a link error.
    assert {:error, %Error{kind: :link}} =
             Capsid.deploy(name, Capsid.Guests.path(:toolkit), force: true)

    assert Capsid.call(name, "count", []) == {:ok, 2}, "guest state was disturbed"
    assert {:ok, %{current: %{version: 1}, previous: nil}} = Capsid.versions(name)
  end

  test "state moves across a swap and back through capsid:host/lifecycle", %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    for n <- 1..3, do: assert(Capsid.call(name, "count", []) == {:ok, n})

    {:ok, _} = Capsid.deploy(name, @v2)
    assert Capsid.call(name, "version", []) == {:ok, 2}
    assert Capsid.call(name, "count", []) == {:ok, 4}

    {:ok, _} = Capsid.rollback(name)
    assert Capsid.call(name, "version", []) == {:ok, 1}
    assert Capsid.call(name, "count", []) == {:ok, 5}
  end

  test "a failing restore aborts the upgrade; the old version keeps serving", %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    {:ok, 1} = Capsid.call(name, "count", [])

    assert {:error, %Error{kind: :link, message: msg}} =
             Capsid.deploy(name, Capsid.Guests.path(:greeter_norestore))

    assert msg =~ "state handoff failed"
    assert msg =~ "restore refused 8 bytes of state"
    assert Capsid.call(name, "version", []) == {:ok, 1}
    assert Capsid.call(name, "count", []) == {:ok, 2}
    assert {:ok, %{current: %{version: 1}, previous: nil}} = Capsid.versions(name)
  end

  test "a crashed deployment process comes back on the version it was serving", %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    {:ok, %{current: %{hash: h2}}} = Capsid.deploy(name, @v2)
    [{pid, _}] = Registry.lookup(Capsid.Deployments, name)

    old_members = Capsid.Pool.members(:sys.get_state(pid).current.pool.pid)

    # Its instances go down with it, and say so in the log: expected here.
    ExUnit.CaptureLog.capture_log(fn ->
      Process.exit(pid, :kill)

      wait_until(fn ->
        match?([{new, _}] when new != pid, Registry.lookup(Capsid.Deployments, name)) and
          not Enum.any?(old_members, &Process.alive?/1)
      end)

      Logger.flush()
    end)

    assert {:ok, %{current: %{hash: ^h2, version: 2}, previous: %{version: 1}}} =
             Capsid.versions(name)

    assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hi Ada, welcome back!"}
    assert {:ok, %{current: %{version: 3}}} = Capsid.rollback(name)
    assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}

    # An undeploy forgets it: the next deploy starts from scratch.
    :ok = Capsid.undeploy(name)
    assert {:ok, %{current: %{version: 1}, previous: nil}} = Capsid.deploy(name, @v2, size: 1)
  end

  test "without lifecycle on both sides, new instances start fresh", %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    {:ok, 1} = Capsid.call(name, "count", [])
    {:ok, _} = Capsid.deploy(name, @bad, force: true)
    {:ok, _} = Capsid.deploy(name, @v1, force: true)
    assert Capsid.call(name, "count", []) == {:ok, 1}
  end

  test "a bad option value in an upgrade raises in the caller; the deployment serves on",
       %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    pid = Capsid.Deployment.whereis(name)

    assert_raise ArgumentError, ~r/invalid value for :timeout/, fn ->
      Capsid.deploy(name, @v2, timeout: -5)
    end

    assert_raise ArgumentError, ~r/:imports/, fn -> Capsid.deploy(name, @v2, imports: :nope) end
    assert Capsid.Deployment.whereis(name) == pid
    assert Capsid.call(name, "version", []) == {:ok, 1}
    assert {:ok, %{current: %{version: 1}}} = Capsid.versions(name)
  end

  test "a second deploy of the same bytes loads from the cache, without compiling", %{name: name} do
    bytes = File.read!(@v2)
    {:ok, _} = Capsid.deploy(name, bytes, size: 1)
    :ok = Capsid.undeploy(name)
    assert {:ok, %{current: %{cache: :hit}}} = Capsid.deploy(name, bytes, size: 1)
  end

  test "swap and rollback events carry both hashes", %{name: name} do
    test = self()
    id = make_ref()

    for e <- [:swap, :rollback] do
      :telemetry.attach(
        {id, e},
        [:capsid, :deploy, e],
        fn ev, m, meta, _ -> send(test, {ev, m, meta}) end,
        nil
      )
    end

    on_exit(fn -> for e <- [:swap, :rollback], do: :telemetry.detach({id, e}) end)

    {:ok, %{current: %{hash: h1}}} = Capsid.deploy(name, @v1, size: 1)
    {:ok, %{current: %{hash: h2}}} = Capsid.deploy(name, @v2)

    assert_receive {[:capsid, :deploy, :swap], %{duration: d},
                    %{name: ^name, old_hash: ^h1, new_hash: ^h2}}

    assert d > 0
    {:ok, _} = Capsid.rollback(name)
    assert_receive {[:capsid, :deploy, :rollback], _, %{name: ^name, old_hash: ^h2, new_hash: ^h1}}
  end

  test "watch: true redeploys when the file changes", %{name: name} do
    path = Path.join(System.tmp_dir!(), "capsid-watch-#{System.unique_integer([:positive])}.wasm")
    on_exit(fn -> File.rm(path) end)
    File.cp!(@v1, path)

    {:ok, _} = Capsid.deploy(name, path, size: 1, watch: true, watch_interval: 20)
    assert Capsid.call(name, "version", []) == {:ok, 1}

    ExUnit.CaptureLog.capture_log(fn ->
      File.cp!(@v2, path)
      wait_until(fn -> Capsid.call(name, "version", []) == {:ok, 2} end)
    end)

    # A bad file is logged and skipped; the running version stays.
    log =
      ExUnit.CaptureLog.capture_log(fn ->
        File.cp!(@bad, path)

        wait_until(fn ->
          match?({:ok, %{watch: %{last_error: %Error{kind: :incompatible}}}}, Capsid.versions(name))
        end)
      end)

    assert log =~ "kept the running version"
    assert Capsid.call(name, "version", []) == {:ok, 2}
  end

  test "bad arguments raise", %{name: name} do
    assert_raise ArgumentError, ~r/unknown option :sise.*Did you mean :size/, fn ->
      Capsid.deploy(name, @v1, sise: 1)
    end

    assert_raise ArgumentError, ~r/file path to watch/, fn ->
      Capsid.deploy(name, File.read!(@v1), watch: true)
    end
  end

  test "a deployment's name may be any term: tenant ids are not atoms" do
    for name <- ["calc-#{System.unique_integer()}", {:tenant, System.unique_integer()}] do
      {:ok, _} = Capsid.deploy(name, @v1, size: 1)
      assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}
      {:ok, _} = Capsid.deploy(name, @v2)
      assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hi Ada, welcome back!"}
      :ok = Capsid.undeploy(name)
      assert {:error, %Capsid.Error{kind: :instance_down}} = Capsid.call(name, "hello", ["Ada"])
    end
  end

  @tag timeout: 180_000
  test "under load, 20 swaps back and forth: no failed call, each reply from one version, " <>
         "and none from the old version once a swap has returned",
       %{name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, size: 2)
    parent = self()
    stop = :atomics.new(1, [])

    callers =
      for _ <- 1..8 do
        spawn_link(fn ->
          results =
            Stream.repeatedly(fn ->
              t = System.monotonic_time()
              reply = Capsid.call(name, "hello", ["Ada"])
              {t, System.monotonic_time(), reply}
            end)
            |> Enum.reduce_while([], fn r, acc ->
              if :atomics.get(stop, 1) == 1, do: {:halt, [r | acc]}, else: {:cont, [r | acc]}
            end)

          send(parent, {:results, results})
        end)
      end

    Process.sleep(50)

    swaps =
      for i <- 1..20 do
        {version, path} = if rem(i, 2) == 1, do: {2, @v2}, else: {1, @v1}
        started = System.monotonic_time()
        assert {:ok, _} = Capsid.deploy(name, path)
        returned = System.monotonic_time()
        Process.sleep(10)
        {started, returned, version}
      end

    :atomics.put(stop, 1, 1)

    results =
      for _ <- callers, reduce: [] do
        acc ->
          assert_receive {:results, r}, 30_000
          r ++ acc
      end

    assert length(results) > 200, "too few calls under load: #{length(results)}"
    failed = Enum.reject(results, fn {_, _, r} -> match?({:ok, _}, r) end)
    assert failed == [], "failed calls: #{inspect(Enum.take(failed, 5))}"

    texts = Map.values(@hello)
    assert Enum.all?(results, fn {_, _, {:ok, text}} -> text in texts end)

    # A call that started after a swap returned, and ended before the next
    # swap started, must have been served by that swap's version. (One that
    # overlaps the next swap may be served by the next version.)
    windows =
      swaps
      |> Enum.chunk_every(2, 1, [{:infinity, nil, nil}])
      |> Enum.map(fn [{_, returned, version}, {next_started, _, _}] ->
        {returned, next_started, version}
      end)

    wrong =
      for {t, t_end, {:ok, text}} <- results,
          {from, to, version} <- windows,
          t >= from and (to == :infinity or t_end < to),
          text != @hello[version],
          do: {t, text, version}

    assert wrong == [],
           "calls landed on the old version after a swap returned: #{inspect(Enum.take(wrong, 5))}"
  end

  ## A failed upgrade leaves every serving instance as it was (issue 23)

  # A hand-written swap fixture (test/fixtures/hand/NAME.wat), as bytes.
  defp wat!(name) do
    wasm = Path.join(System.tmp_dir!(), "capsid-#{name}-#{System.unique_integer([:positive])}.wasm")
    source = Path.join(@hand, "#{name}.wat")
    {_, 0} = System.cmd(Capsid.Hostile.wat2wasm!(), [source, wasm], stderr_to_stdout: true)
    bytes = File.read!(wasm)
    File.rm(wasm)
    bytes
  end

  defp members(name) do
    Capsid.Pool.members(:sys.get_state(Capsid.Deployment.whereis(name)).current.pool.pid)
  end

  defp bump(target, n), do: for(_ <- 1..n//1, do: {:ok, _} = Capsid.call(target, "bump", []))

  test "a snapshot that moves the state out, then a failing restore: the state stays",
       %{name: name} do
    {:ok, _} = Capsid.deploy(name, wat!("swap_drain"), size: 1)
    bump(name, 10)

    assert {:error, %Error{kind: :link, message: msg}} = Capsid.deploy(name, wat!("swap_norestore"))

    assert msg =~ "state handoff failed, the running version keeps serving"
    assert {:ok, %{current: %{version: 1}, previous: nil}} = Capsid.versions(name)
    assert Capsid.call(name, "get", []) == {:ok, 10}
    assert Capsid.call(name, "bump", []) == {:ok, 11}
  end

  test "a restore that fails only on the live state: the state moved out is put back",
       %{name: name} do
    # swap_picky accepts a copy's state (globals fresh: 0) and refuses the
    # live one (10): only the real handoff fails, after the live snapshot
    # drained the counter.
    {:ok, _} = Capsid.deploy(name, wat!("swap_drain"), size: 1)
    bump(name, 10)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        assert {:error, %Error{kind: :link, message: msg}} = Capsid.deploy(name, wat!("swap_picky"))

        assert msg =~ "state handoff failed"
      end)

    assert Capsid.call(name, "get", []) == {:ok, 10}
    assert Capsid.call(name, "bump", []) == {:ok, 11}
    assert log =~ "put back"
  end

  test "a trapping snapshot leaves every member exactly as it was, wasm globals included",
       %{name: name} do
    {:ok, _} = Capsid.deploy(name, wat!("swap_trap"), size: 2)
    [a, b] = members(name)
    bump(a, 10)
    bump(b, 3)

    assert {:error, %Error{kind: :link, message: msg}} = Capsid.deploy(name, wat!("swap_drain"))
    assert msg =~ "state handoff failed"
    assert msg =~ "unreachable"
    assert members(name) == [a, b]
    assert Capsid.call(a, "get", []) == {:ok, 10}
    assert Capsid.call(b, "get", []) == {:ok, 3}
    # Not recycled either: nothing trapped in them.
    assert Capsid.Instance.info(a).recycles == 0
    assert Capsid.Instance.info(b).recycles == 0
  end

  test "a successful swap carries a draining snapshot's state", %{name: name} do
    {:ok, _} = Capsid.deploy(name, wat!("swap_drain"), size: 1)
    bump(name, 7)
    assert {:ok, %{current: %{version: 2}}} = Capsid.deploy(name, wat!("swap_drain"))
    assert Capsid.call(name, "get", []) == {:ok, 7}
  end

  test "an upgrade that shrinks a pool is refused unless the caller merges or drops state",
       %{name: name} do
    {:ok, _} = Capsid.deploy(name, @stateful, size: 2)
    [a, b] = members(name)
    bump(a, 3)
    bump(b, 5)

    assert {:error, %Error{kind: :incompatible, message: msg}} =
             Capsid.deploy(name, @stateful, size: 1)

    assert msg =~ "from 2 to 1"
    assert msg =~ "merge:"
    assert msg =~ "drop_state: true"
    assert {:ok, %{current: %{version: 1}}} = Capsid.versions(name)
    assert Capsid.call(a, "digest", []) == {:ok, {3, 0, 0}}
    assert Capsid.call(b, "digest", []) == {:ok, {5, 0, 0}}

    # merge: gets every member's snapshot, returns one per new member.
    sum = fn snapshots ->
      total = Enum.sum(for <<n::little-64, _::binary>> <- snapshots, do: n)
      [<<total::little-64>>]
    end

    assert {:ok, %{current: %{version: 2}}} = Capsid.deploy(name, @stateful, size: 1, merge: sum)
    assert Capsid.call(name, "digest", []) == {:ok, {8, 0, 0}}

    # drop_state: true keeps the first members' state and drops the rest.
    {:ok, _} = Capsid.deploy(name, @stateful, size: 2)
    [c, _] = members(name)
    bump(c, 1)

    assert {:ok, %{current: %{version: 4}}} =
             Capsid.deploy(name, @stateful, size: 1, drop_state: true)

    assert Capsid.call(name, "digest", []) == {:ok, {9, 0, 0}}

    # A merge that answers the wrong number of states fails the upgrade.
    assert {:error, %Error{kind: :bad_argument, message: msg}} =
             Capsid.deploy(name, @stateful, size: 1, merge: fn _ -> [] end)

    assert msg =~ "merge"
    assert Capsid.call(name, "digest", []) == {:ok, {9, 0, 0}}

    assert_raise ArgumentError, ~r/:merge/, fn -> Capsid.deploy(name, @stateful, merge: :sum) end

    assert_raise ArgumentError, ~r/:drop_state/, fn ->
      Capsid.deploy(name, @stateful, drop_state: 1)
    end
  end

  @tag timeout: 120_000
  test "under load, every acknowledged update is in the state handed over", %{name: name} do
    {:ok, _} = Capsid.deploy(name, @stateful, size: 1)
    parent = self()
    stop = :atomics.new(1, [])

    callers =
      for _ <- 1..4 do
        spawn_link(fn ->
          acked = count_acks(name, stop, 0)
          send(parent, {:acked, self(), acked})
        end)
      end

    Process.sleep(20)

    for _ <- 1..15 do
      assert {:ok, _} = Capsid.deploy(name, @stateful)
      Process.sleep(5)
    end

    :atomics.put(stop, 1, 1)

    acked =
      for pid <- callers, reduce: 0 do
        acc ->
          assert_receive {:acked, ^pid, n}, 30_000
          acc + n
      end

    assert acked > 1000, "too few calls under load: #{acked}"
    assert {:ok, {counter, _, _}} = Capsid.call(name, "digest", [])
    assert counter == acked, "#{acked - counter} acknowledged updates lost across the swaps"
  end

  defp count_acks(name, stop, n) do
    if :atomics.get(stop, 1) == 1 do
      n
    else
      case Capsid.call(name, "bump", []) do
        {:ok, _} -> count_acks(name, stop, n + 1)
        {:error, _} -> count_acks(name, stop, n)
      end
    end
  end
end
