defmodule Capsid.ResourceDropTest do
  # Issue 23, item 4: the destructor of a handle that one caller let go
  # (garbage-collected) must never run inside another caller's call: not in
  # its result, its stderr, its fuel or its deadline. The `dtor` guest's
  # destructors panic after writing a secret to stderr, or spin.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog

  alias Capsid.{Error, Resource, Trap}

  @secret "SECRET-A card 4111-1111"
  @event [:capsid, :instance, :destructors]

  setup_all do
    %{component: Capsid.Component.load!(Capsid.Guests.path(:dtor))}
  end

  setup do
    test = self()
    id = make_ref()

    for event <- [@event, [:capsid, :instance, :recycle]] do
      :telemetry.attach({id, event}, event, fn e, m, meta, _ -> send(test, {e, m, meta}) end, nil)
    end

    on_exit(fn ->
      for event <- [@event, [:capsid, :instance, :recycle]], do: :telemetry.detach({id, event})
    end)
  end

  defp start(c, opts \\ []) do
    start_supervised!({Capsid.Instance, [component: c] ++ opts}, id: make_ref())
  end

  # Caller A makes a hazard in its own process and lets it go: the handle
  # dies with A's heap, and is collected.
  defp abandon(target, mode, ms \\ 0) do
    a =
      Task.async(fn ->
        {:ok, %Resource{}} = Capsid.call(target, "[constructor]hazard", [mode, @secret, ms])
        :ok
      end)

    :ok = Task.await(a)
    :erlang.garbage_collect()
  end

  # Caller B: another process, an unrelated call with a short timeout.
  defp ping(target, timeout \\ 50) do
    Task.async(fn -> Capsid.call(target, "ping", [], timeout: timeout) end) |> Task.await()
  end

  defp assert_clean(results) do
    assert Enum.all?(results, &(&1 == {:ok, "pong"})), inspect(results)
    refute inspect(results, limit: :infinity, printable_limit: :infinity) =~ "SECRET"
  end

  test "a panicking destructor of A's collected handle is not B's trap, and B never sees A's stderr",
       %{component: c} do
    pid = start(c)
    {:ok, "pong"} = ping(pid)

    log =
      capture_log(fn ->
        abandon(pid, "panic")
        assert_clean(for _ <- 1..5, do: ping(pid))

        # The destructor ran on the instance's own time, and its failure was
        # reported there.
        assert_receive {@event, %{duration: d, fuel: fuel},
                        %{instance: ^pid, result: {:trap, %Trap{} = trap}}},
                       5_000

        assert d > 0 and fuel > 0
        assert trap.stderr =~ @secret
        assert_receive {[:capsid, :instance, :recycle], _, %{instance: ^pid, reason: kind}}
        assert kind == trap.kind
        # Logged before the event was emitted; flushed before capture ends.
        Logger.flush()
      end)

    assert log =~ "destructor"
    assert log =~ "trapped"
    assert log =~ @secret
    assert_clean([ping(pid)])
  end

  test "what a destructor wrote is not in the stderr of B's later trap", %{component: c} do
    pid = start(c)

    # Writes the secret to stderr and returns: nobody asked for its output.
    abandon(pid, "spin", 1)
    assert_receive {@event, _, %{instance: ^pid, result: :ok}}, 5_000
    assert {:error, %Trap{stderr: stderr}} = Capsid.call(pid, "fail", [])
    assert stderr =~ "ping failed on purpose"
    refute stderr =~ "SECRET"
  end

  test "a trapping destructor recycles the instance as any trap does", %{component: c} do
    pid = start(c)

    capture_log(fn ->
      abandon(pid, "panic")
      assert_receive {@event, _, %{instance: ^pid, result: {:trap, %Trap{}}}}, 5_000
    end)

    info = Capsid.Instance.info(pid)
    assert info.recycles == 1
    assert info.traps.unreachable == 1
    # Not a call: nobody called anything.
    assert info.calls == 1
    # The next caller gets a fresh instance.
    assert_clean([ping(pid)])
    assert Capsid.call(pid, "finished", []) == {:ok, 0}
  end

  test "a slow destructor does not spend B's deadline", %{component: c} do
    pid = start(c)

    abandon(pid, "spin", 300)
    # B's 50 ms are B's: the 300 ms destructor runs outside its call (B may
    # wait for its turn behind it, as behind any call, but not time out).
    assert_clean(for _ <- 1..3, do: ping(pid))
    assert_receive {@event, %{duration: d}, %{instance: ^pid, result: :ok}}, 5_000
    assert System.convert_time_unit(d, :native, :millisecond) >= 300
    assert Capsid.call(pid, "finished", []) == {:ok, 1}
    assert Capsid.Instance.info(pid).recycles == 0
  end

  test "a destructor that outlives the instance's timeout is stopped by it, off B's call",
       %{component: c} do
    pid = start(c, timeout: 200)

    capture_log(fn ->
      abandon(pid, "spin", 60_000)
      assert_clean(for _ <- 1..3, do: ping(pid))

      assert_receive {@event, _, %{instance: ^pid, result: {:trap, %Trap{kind: :timeout}}}},
                     5_000
    end)

    assert_clean([ping(pid)])
  end

  test "destructors that a busy instance turned away run later", %{component: c} do
    pid = start(c, queue_timeout: 50)
    {:ok, slow} = Capsid.call(pid, "[constructor]hazard", ["spin", "slow", 1_500])
    test = self()

    keeper =
      spawn(fn ->
        {:ok, _} = Capsid.call(pid, "[constructor]hazard", ["quiet", "y", 0])
        send(test, :made)
        receive(do: (:go -> :ok))
      end)

    assert_receive :made
    # Holds the instance for 1.5 s (its own destructor, in its own call).
    holder = Task.async(fn -> Resource.drop(slow) end)
    Process.sleep(100)
    # The keeper's handle dies with it, while the holder has the instance.
    send(keeper, :go)

    assert_receive {@event, _, %{instance: ^pid, result: {:error, %Error{kind: :busy}}}}, 2_000
    assert Task.await(holder) == :ok
    assert_receive {@event, _, %{instance: ^pid, result: :ok}}, 3_000
    assert Capsid.call(pid, "finished", []) == {:ok, 2}
  end

  test "Resource.drop/1 runs only its own destructor, not one another caller left behind",
       %{component: c} do
    pid = start(c)
    {:ok, mine} = Capsid.call(pid, "[constructor]hazard", ["quiet", "mine", 0])

    capture_log(fn ->
      abandon(pid, "panic")
      assert Resource.drop(mine) == :ok
      assert_receive {@event, _, %{instance: ^pid, result: {:trap, _}}}, 5_000
    end)

    # Its own destructor failing is its own call's trap.
    {:ok, own} = Capsid.call(pid, "[constructor]hazard", ["panic", "own secret", 0])
    assert {:error, %Trap{stderr: stderr}} = Resource.drop(own)
    assert stderr =~ "own secret"
    refute stderr =~ @secret
  end

  test "pools: a member's collected handle is destroyed by that member, off callers' calls",
       %{component: c} do
    {:ok, pool} = Capsid.Pool.start_link(component: c, size: 2)
    members = Capsid.Pool.members(pool)

    capture_log(fn ->
      abandon(pool, "panic")
      results = for _ <- 1..8, do: Task.async(fn -> ping(pool) end)
      assert_clean(Task.await_many(results))
      assert_receive {@event, _, %{instance: member, result: {:trap, _}}}, 5_000
      assert member in members
    end)

    assert_clean(for _ <- 1..4, do: ping(pool))
  end
end
