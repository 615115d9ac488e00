defmodule Capsid.ConcurrencyTest do
  import Capsid.TestHelpers
  use ExUnit.Case, async: true

  alias Capsid.{Error, Instance, Pool, Trap}

  doctest Capsid.Pool

  setup_all do
    %{component: Capsid.Component.load!(Capsid.Guests.path(:faulty))}
  end

  # Occupies `pid` with a long call from another process; returns its task.
  defp occupy(pid, iterations \\ 300_000_000) do
    task = Task.async(fn -> Capsid.call(pid, "burn", [iterations]) end)
    wait_until(fn -> Instance.info(pid).calls == 0 and busy?(pid) end)
    task
  end

  defp busy?(pid) do
    # A zero-wait probe: a busy instance makes the caller give up at once.
    match?({:error, %Error{kind: :busy}}, Capsid.call(pid, "ok", [0], queue_timeout: 0))
  end

  test "1,000 concurrent callers: one at a time, in arrival order, no lost or mixed replies",
       %{component: c} do
    test = self()

    # The guest's import blocks until released: the instance stays busy for
    # exactly as long as the test needs.
    hook = fn x ->
      send(test, {:holding, self()})

      receive do
        :release -> x
      end
    end

    pid = start_instance(c, imports: %{"hook" => hook}, timeout: 120_000)
    holder = Task.async(fn -> Capsid.call(pid, "call-hook", [7], queue_timeout: 120_000) end)
    assert_receive {:holding, hook_pid}, 5_000

    callers =
      for i <- 1..1_000 do
        caller =
          spawn_link(fn ->
            send(test, {:reply, i, Capsid.call(pid, "bump", [], queue_timeout: 120_000)})
          end)

        # Each caller is in the queue before the next one starts.
        wait_until(fn -> Instance.info(pid).waiting == i end)
        caller
      end

    send(hook_pid, :release)
    assert Task.await(holder, 60_000) == {:ok, 7}

    replies =
      for _ <- callers do
        assert_receive {:reply, i, {:ok, n}}, 60_000
        {i, n}
      end

    # bump returns the guest's call counter: caller i was served i-th.
    assert Enum.sort(replies) == Enum.map(1..1_000, &{&1, &1})
    assert Instance.info(pid).waiting == 0
  end

  test "a full queue answers :busy at once", %{component: c} do
    pid = start_instance(c, max_queue: 2, fuel: :infinity, timeout: 60_000)
    holder = occupy(pid)
    waiters = for _ <- 1..2, do: Task.async(fn -> Capsid.call(pid, "ok", [1]) end)
    wait_until(fn -> Instance.info(pid).waiting == 2 end)

    assert {:error, %Error{kind: :busy, message: msg}} = Capsid.call(pid, "ok", [1])
    assert msg =~ "2 callers are already waiting (max_queue: 2)"

    assert {:ok, _} = Task.await(holder, 60_000)
    assert Enum.map(waiters, &Task.await/1) == [{:ok, 2}, {:ok, 2}]
  end

  test "a caller that waits longer than queue_timeout gives up with :busy", %{component: c} do
    pid = start_instance(c, fuel: :infinity, timeout: 60_000)
    holder = occupy(pid)
    {micros, result} = :timer.tc(fn -> Capsid.call(pid, "ok", [1], queue_timeout: 50) end)
    assert {:error, %Error{kind: :busy, message: msg}} = result
    assert msg =~ "50 ms"
    assert micros >= 50_000
    assert Instance.info(pid).waiting == 0
    assert {:ok, _} = Task.await(holder, 60_000)
    assert Capsid.call(pid, "ok", [1]) == {:ok, 2}
  end

  test "a caller killed mid-call frees the instance for the next", %{component: c} do
    pid = start_instance(c, fuel: :infinity, timeout: 60_000)
    victim = spawn(fn -> Capsid.call(pid, "spin", []) end)
    wait_until(fn -> busy?(pid) end)
    waiter = Task.async(fn -> Capsid.call(pid, "ok", [1], queue_timeout: 10_000) end)
    wait_until(fn -> Instance.info(pid).waiting == 1 end)

    Process.exit(victim, :kill)
    assert Task.await(waiter) == {:ok, 2}
    assert %{traps: %{cancelled: 1}, recycles: 1} = Instance.info(pid)
  end

  test "a call from inside an import into the same instance is refused, not a deadlock",
       %{component: c} do
    test = self()

    hook = fn x ->
      send(test, :in_hook)
      # Runs in the import's own process: it queues behind the call that
      # is waiting for this very import, until its queue_timeout.
      Capsid.call(:reentrant_capsid, "ok", [x], queue_timeout: 100)
      x
    end

    _pid = start_instance(c, name: :reentrant_capsid, imports: %{"hook" => hook}, timeout: 2_000)
    assert Capsid.call(:reentrant_capsid, "call-hook", [5]) == {:ok, 5}
    assert_received :in_hook
  end

  describe "pools" do
    test "callers on different schedulers use different members", %{component: c} do
      pool = start_supervised!({Pool, component: c, size: 2, imports: %{"hook" => & &1}})
      members = Pool.members(pool)
      assert length(members) == 2

      # One long call holds a member; the other member keeps serving.
      slow = Task.async(fn -> Capsid.call(pool, "burn", [200_000_000]) end)
      wait_until(fn -> Enum.any?(members, &busy?/1) end)

      for _ <- 1..20, do: assert(Capsid.call(pool, "ok", [1]) == {:ok, 2})
      assert {:ok, _} = Task.await(slow, 30_000)

      infos = Enum.map(members, &Instance.info/1)
      assert Enum.all?(infos, &(&1.calls > 0)), "a member served nothing: #{inspect(infos)}"
      # 21 calls plus the busy? probes that found a member free.
      assert Pool.info(pool).calls >= 21
    end

    test "a crashed member is replaced and the pool keeps serving", %{component: c} do
      pool = start_supervised!({Pool, component: c, size: 2, imports: %{"hook" => & &1}})
      [a, b] = Pool.members(pool)
      Process.exit(a, :kill)
      wait_until(fn -> a not in Pool.members(pool) end)

      assert [_, _] = members = Pool.members(pool)
      assert b in members
      assert %{replaced: 1, size: 2} = Pool.info(pool)
      for _ <- 1..10, do: assert(Capsid.call(pool, "ok", [1]) == {:ok, 2})
    end

    test "a trapping member recycles and stays", %{component: c} do
      pool = start_supervised!({Pool, component: c, size: 1, imports: %{"hook" => & &1}})
      [member] = Pool.members(pool)
      assert {:error, %Trap{kind: :unreachable}} = Capsid.call(pool, "hit-unreachable", [])
      assert Capsid.call(pool, "ok", [1]) == {:ok, 2}
      assert Pool.members(pool) == [member]
      assert %{recycles: 1, replaced: 0} = Pool.info(pool)
    end

    test "by name, and :instance_down once stopped", %{component: c} do
      {:ok, pool} =
        Pool.start_link(component: c, size: 2, imports: %{"hook" => & &1}, name: :capsid_pool_test)

      assert Capsid.call(:capsid_pool_test, "ok", [1]) == {:ok, 2}
      members = Pool.members(pool)
      GenServer.stop(pool)
      assert {:error, %Error{kind: :instance_down}} = Capsid.call(:capsid_pool_test, "ok", [1])
      refute Enum.any?(members, &Process.alive?/1)
    end

    test "bad options and link errors come back from start_link", %{component: c} do
      assert_raise ArgumentError, ~r/:size/, fn -> Pool.start_link(component: c, size: 0) end
      assert {:error, %Error{kind: :link, message: msg}} = Pool.start_link(component: c, size: 2)
      assert msg =~ "hook"
    end
  end
end
