defmodule Capsid.SandboxTest do
  @moduledoc """
  Every faulty guest in guest/faulty gets the right trap within its limit,
  the instance answers the next good call, and other processes keep working.
  """
  import Capsid.TestHelpers
  use ExUnit.Case, async: true

  alias Capsid.{Instance, Trap}

  @faulty Capsid.Guests.path(:faulty)

  setup_all do
    %{component: Capsid.Component.load!(@faulty)}
  end

  # A process doing plain Elixir work the whole time; returns a function
  # that stops it and tells how many rounds it completed.
  defp bystander do
    in_background(0, 0, fn n ->
      _ = Enum.sum(1..1_000)
      n + 1
    end)
  end

  # `attempts:` bounds the tries of the bystander check below (1 for a call
  # whose retry would not trap again).
  defp assert_trap(pid, function, args, kind, opts \\ []) do
    {attempts, opts} = Keyword.pop(opts, :attempts, 3)
    stop = bystander()
    {micros, result} = :timer.tc(fn -> Capsid.call(pid, function, args, opts) end)
    rounds = stop.()
    assert {:error, %Trap{kind: ^kind} = trap} = result
    assert Capsid.call(pid, "ok", [41]) == {:ok, 42}, "instance did not recover after #{function}"

    # A call shorter than a few ms may end before the bystander is scheduled
    # at all; it still had to answer `stop` afterwards. A longer call with no
    # bystander progress is tried again: on a loaded machine the OS can stall
    # the scheduler threads themselves for 20+ ms (seen in CI while a cargo
    # build ran), but a guest that blocks a scheduler does it every time.
    if micros > 20_000 and rounds == 0 do
      assert attempts > 1, "a bystander process made no progress while #{function} ran"
      assert_trap(pid, function, args, kind, [attempts: attempts - 1] ++ opts)
    else
      {trap, div(micros, 1000)}
    end
  end

  describe "runaway loops" do
    test "an infinite loop stops on fuel", %{component: c} do
      pid = start_instance(c, fuel: 50_000_000)
      {trap, _ms} = assert_trap(pid, "spin", [], :out_of_fuel)
      assert trap.message =~ "fuel"
      assert "spin" in trap.backtrace
    end

    test "with unlimited fuel it stops on the timeout", %{component: c} do
      pid = start_instance(c, fuel: :infinity, timeout: 200)
      {trap, ms} = assert_trap(pid, "spin", [], :timeout)
      assert trap.message =~ "timeout of 200 ms"
      assert ms >= 200 and ms < 2_000, "stopped after #{ms} ms"
    end

    test "with the default fuel, the timeout is what stops a loop", %{component: c} do
      for timeout <- [100, 1_000] do
        pid = start_instance(c, timeout: timeout)
        {trap, ms} = assert_trap(pid, "spin", [], :timeout)
        assert trap.message =~ "timeout of #{timeout} ms"
        assert ms >= timeout
      end
    end

    test "a timeout never fires before its time, in the guest or waiting on an import", %{
      component: c
    } do
      spinner = start_instance(c, fuel: :infinity, timeout: 60_000)
      sleeper = start_instance(c, timeout: 60_000, hook: fn x -> Process.sleep(60_000) && x end)

      for {t, runs} <- [{1, 40}, {5, 40}, {20, 10}, {200, 3}], _ <- 1..runs do
        {us, result} = :timer.tc(fn -> Capsid.call(spinner, "spin", [], timeout: t) end)
        assert {:error, %Trap{kind: :timeout}} = result
        assert us >= t * 1000, "a #{t} ms timeout fired after #{us} µs"

        {us, result} = :timer.tc(fn -> Capsid.call(sleeper, "call-hook", [1], timeout: t) end)
        assert {:error, %Trap{kind: :timeout}} = result
        assert us >= t * 1000, "a #{t} ms timeout fired after #{us} µs waiting on an import"
      end
    end

    test "a guest that behaves until its N-th call, then loops", %{component: c} do
      pid = start_instance(c, timeout: 300)
      assert Capsid.call(pid, "flaky", [3]) == {:ok, 1}
      assert Capsid.call(pid, "flaky", [3]) == {:ok, 2}
      assert_trap(pid, "flaky", [3], :out_of_fuel, fuel: 100_000_000, attempts: 1)
      # The recycled instance starts from fresh guest state.
      assert Capsid.call(pid, "flaky", [3]) == {:ok, 1}
      assert %{recycles: 1, traps: %{out_of_fuel: 1}} = Instance.info(pid)
    end
  end

  describe "stack" do
    test "unbounded recursion is a stack overflow, under the VM's default flags", %{component: c} do
      pid = start_instance(c)
      {trap, _} = assert_trap(pid, "recurse", [18_446_744_073_709_551_615], :stack_overflow)
      assert "faulty::recurse" in trap.backtrace
      assert length(trap.backtrace) > 10
    end

    test "recursion with large frames exhausts the shadow stack", %{component: c} do
      pid = start_instance(c)
      assert_trap(pid, "recurse-big", [18_446_744_073_709_551_615], :memory_out_of_bounds)
    end
  end

  describe "memory" do
    test "an allocation bomb stops at max_memory", %{component: c} do
      pid = start_instance(c, max_memory: 32 * 1024 * 1024)
      {trap, _} = assert_trap(pid, "alloc-bomb", [], :memory_limit)
      assert trap.message =~ "the limit is 33554432 bytes (max_memory)"
    end

    test "a per-call max_memory narrows the instance's", %{component: c} do
      pid = start_instance(c, max_memory: 256 * 1024 * 1024)
      assert_trap(pid, "big-string", [100], :memory_limit, max_memory: 64 * 1024 * 1024)
    end

    test "a 100 MB string comes back whole when the limit allows it", %{component: c} do
      # A memory test, not a timing one: CI machines may be slow and busy.
      pid = start_instance(c, max_memory: 512 * 1024 * 1024, timeout: 60_000)
      assert {:ok, s} = Capsid.call(pid, "big-string", [100])
      assert byte_size(s) == 100 * 1024 * 1024
      assert binary_part(s, 0, 3) == "xxx"
    end

    test "an out-of-bounds read", %{component: c} do
      pid = start_instance(c)
      {trap, _} = assert_trap(pid, "read-oob", [], :memory_out_of_bounds)
      assert trap.message =~ "out of bounds memory access"
    end
  end

  describe "faults" do
    test "a panic is :unreachable with its message in stderr", %{component: c} do
      pid = start_instance(c)
      {trap, _} = assert_trap(pid, "panic-with", ["the answer is not 41"], :unreachable)
      assert trap.stderr =~ "panicked at"
      assert trap.stderr =~ "the answer is not 41"
      assert Exception.message(trap) =~ "the answer is not 41"
    end

    # The guest's stderr is kept up to 64 KiB per call (delivered as
    # configured); the trap carries a few KiB of it: its start and its end,
    # where a panic's message is.
    test "a trap carries at most a few KiB of a long panic's stderr", %{component: c} do
      pid = start_instance(c)
      message = String.duplicate("x", 100_000)
      {trap, _} = assert_trap(pid, "panic-with", [message], :unreachable)
      assert byte_size(trap.stderr) < 4_200
      assert trap.stderr =~ "panicked at"
      assert trap.stderr =~ ~r/… \d+ bytes more …/
      assert trap.stderr =~ "more bytes dropped]"
    end

    test "unreachable", %{component: c} do
      pid = start_instance(c)
      {trap, _} = assert_trap(pid, "hit-unreachable", [], :unreachable)
      assert trap.backtrace == ["hit-unreachable"]
    end

    test "integer division by zero and overflow are wasm traps", %{component: c} do
      pid = start_instance(c)
      assert_trap(pid, "raw-div", [1, 0], :divide_by_zero)
      assert_trap(pid, "raw-div", [-2_147_483_648, -1], :integer_overflow)
      assert Capsid.call(pid, "raw-div", [7, 2]) == {:ok, 3}
    end

    test "guest output never reaches the VM's terminal", %{component: c} do
      pid = start_instance(c)

      output =
        ExUnit.CaptureIO.capture_io(fn ->
          assert Capsid.call(pid, "chatty", ["noise"]) == {:ok, nil}
        end)

      assert output == ""
    end
  end

  describe "imports" do
    test "an import that raises traps as :import_failed with the message", %{component: c} do
      pid = start_instance(c, hook: fn _ -> raise ArgumentError, "hook refused 7" end)
      {trap, _} = assert_trap(pid, "call-hook", [7], :import_failed)
      assert trap.message == "hook refused 7"
    end

    test "an import that never returns ends in :timeout", %{component: c} do
      test = self()

      hook = fn _ ->
        send(test, {:hook_running, self()})
        Process.sleep(:infinity)
      end

      pid = start_instance(c, hook: hook, timeout: 300)
      {trap, ms} = assert_trap(pid, "call-hook", [1], :timeout)
      assert trap.message =~ "300 ms"
      assert ms >= 300 and ms < 2_000
      assert_received {:hook_running, hook_pid}
      refute Process.alive?(hook_pid), "the abandoned import process was not stopped"
    end

    test "an import runs in its own process, and can call another instance", %{component: c} do
      other = start_instance(c)
      test = self()

      hook = fn x ->
        send(test, {:hook_in, self()})
        Capsid.call!(other, "ok", [x])
      end

      pid = start_instance(c, hook: hook)
      assert Capsid.call(pid, "call-hook", [9]) == {:ok, 10}
      assert_received {:hook_in, hook_pid}
      assert hook_pid != self()
    end
  end

  describe "inline imports" do
    test "run in the calling process", %{component: c} do
      test = self()
      hook = fn x -> send(test, {:hook_in, self()}) && x * 2 end
      pid = start_instance(c, hook: {hook, inline: true})
      assert Capsid.call(pid, "call-hook", [21]) == {:ok, 42}
      assert_received {:hook_in, ^test}
    end

    test "a raise is :import_failed, and the instance goes on", %{component: c} do
      pid = start_instance(c, hook: {fn _ -> raise "inline refused" end, inline: true})
      {trap, _} = assert_trap(pid, "call-hook", [7], :import_failed)
      assert trap.message == "inline refused"
      {trap, _} = assert_trap(pid, "call-hook", [7], :import_failed)
      assert trap.message == "inline refused"
    end

    test "one that overruns the deadline ends the call in :timeout when it returns",
         %{component: c} do
      hook = fn x -> Process.sleep(400) && x end
      pid = start_instance(c, hook: {hook, inline: true}, timeout: 100)
      {trap, ms} = assert_trap(pid, "call-hook", [1], :timeout)
      assert trap.message =~ "100 ms"
      assert ms >= 400
      assert Capsid.call(pid, "ok", [1]) == {:ok, 2}
    end

    test "a caller killed inside one releases the instance", %{component: c} do
      test = self()

      hook = fn _ ->
        send(test, {:hook_in, self()})
        Process.sleep(:infinity)
      end

      pid = start_instance(c, hook: {hook, inline: true})
      caller = spawn(fn -> Capsid.call(pid, "call-hook", [1]) end)
      assert_receive {:hook_in, ^caller}, 5_000
      Process.exit(caller, :kill)
      assert wait_until(fn -> Capsid.call(pid, "ok", [1]) == {:ok, 2} end)
    end

    # The instance keeps its monitor on a caller after the call (creating one
    # per call cost more than the rest of an import's round trip).
    test "a caller killed inside one, after earlier calls, releases the instance",
         %{component: c} do
      test = self()

      hook = fn x ->
        if x == 0 do
          send(test, {:hook_in, self()})
          Process.sleep(:infinity)
        end

        x
      end

      pid = start_instance(c, hook: {hook, inline: true})

      caller =
        spawn(fn ->
          for x <- 1..3, do: {:ok, ^x} = Capsid.call(pid, "call-hook", [x])
          Capsid.call(pid, "call-hook", [0])
        end)

      assert_receive {:hook_in, ^caller}, 5_000
      Process.exit(caller, :kill)
      assert wait_until(fn -> Capsid.call(pid, "ok", [1]) == {:ok, 2} end)
      assert Capsid.Instance.info(pid).traps.cancelled == 1
    end

    test "callers taking turns are not left with monitors, and their exits are harmless",
         %{component: c} do
      pid = start_instance(c, hook: {& &1, inline: true})
      test = self()

      callers =
        for _ <- 1..4 do
          spawn_link(fn ->
            for x <- 1..200, do: {:ok, ^x} = Capsid.call(pid, "call-hook", [x])
            send(test, {:done, self()})
            receive(do: (:exit -> :ok))
          end)
        end

      for caller <- callers, do: assert_receive({:done, ^caller}, 10_000)

      # At most one monitor from the instance on any caller, whatever the
      # number of calls (one per call would be 200).
      for caller <- callers do
        {:monitored_by, by} = Process.info(caller, :monitored_by)
        assert length(by) <= 2, inspect(by)
      end

      for caller <- callers, do: send(caller, :exit)
      assert wait_until(fn -> Enum.all?(callers, &(not Process.alive?(&1))) end)
      assert Capsid.call(pid, "call-hook", [5]) == {:ok, 5}
      assert Capsid.Instance.info(pid).traps.cancelled == 0
    end

    test "callers outliving the instance that keeps their monitors exit harmlessly",
         %{component: c} do
      test = self()

      callers =
        for _ <- 1..20 do
          spawn(fn ->
            {:ok, pid} =
              Capsid.Instance.start(component: c, imports: %{"hook" => {& &1, inline: true}})

            {:ok, 3} = Capsid.call(pid, "call-hook", [3])
            GenServer.stop(pid)
            send(test, {:stopped, self()})
            receive(do: (:exit -> :ok))
          end)
        end

      for caller <- callers, do: assert_receive({:stopped, ^caller}, 10_000)
      # The instances are gone; their resources go with the next collections.
      for caller <- callers, do: :erlang.garbage_collect(caller)
      :erlang.garbage_collect()

      for {caller, i} <- Enum.with_index(callers) do
        if rem(i, 2) == 0, do: Process.exit(caller, :kill), else: send(caller, :exit)
      end

      assert wait_until(fn -> Enum.all?(callers, &(not Process.alive?(&1))) end)
      pid = start_instance(c, hook: {& &1, inline: true})
      assert Capsid.call(pid, "call-hook", [4]) == {:ok, 4}
    end

    test "a call of its own instance from inside one does not deadlock", %{component: c} do
      test = self()
      # Inline: the hook runs in this process, so it sees its dictionary.
      hook = fn x -> send(test, {:nested, Capsid.call(Process.get(:instance), "ok", [x])}) && x end
      pid = start_instance(c, hook: {hook, inline: true}, queue_timeout: 200)
      Process.put(:instance, pid)
      assert Capsid.call(pid, "call-hook", [5]) == {:ok, 5}
      assert_received {:nested, {:error, %Capsid.Error{kind: :busy}}}
    end

    test "bad options are refused with the expected shape", %{component: c} do
      assert_raise ArgumentError, ~r/expected \[inline: boolean\]/, fn ->
        Capsid.Instance.start(component: c, imports: %{"hook" => {& &1, inline: :yes}})
      end
    end
  end

  describe "limits" do
    test "a per-call fuel narrows, but never raises, the instance's", %{component: c} do
      pid = start_instance(c, fuel: 20_000_000)
      assert {:ok, _} = Capsid.call(pid, "burn", [100_000])
      assert_trap(pid, "burn", [100_000], :out_of_fuel, fuel: 1_000)
      assert_trap(pid, "burn", [100_000_000], :out_of_fuel, fuel: :infinity)
    end

    test "a per-call timeout never raises the instance's", %{component: c} do
      pid = start_instance(c, fuel: :infinity, timeout: 100)
      {trap, ms} = assert_trap(pid, "spin", [], :timeout, timeout: 60_000)
      assert trap.message =~ "100 ms"
      assert ms < 2_000
    end

    test "info counts calls, traps by kind, recycles and fuel", %{component: c} do
      pid = start_instance(c)
      assert {:ok, _} = Capsid.call(pid, "burn", [1_000])
      {:error, _} = Capsid.call(pid, "hit-unreachable", [])
      {:error, _} = Capsid.call(pid, "raw-div", [1, 0])
      info = Instance.info(pid)
      assert info.calls == 3
      assert info.recycles == 2
      assert info.traps.unreachable == 1
      assert info.traps.divide_by_zero == 1
      assert info.fuel_used > 1_000
      # 1 at start, 1 per recycle (lazily, on the next call): 2 so far.
      assert info.instantiations == 2
    end
  end

  describe "telemetry" do
    setup do
      test = self()
      id = make_ref()

      for event <- [[:capsid, :call, :stop], [:capsid, :instance, :recycle]] do
        :telemetry.attach({id, event}, event, fn e, m, meta, _ -> send(test, {e, m, meta}) end, nil)
      end

      on_exit(fn ->
        for event <- [[:capsid, :call, :stop], [:capsid, :instance, :recycle]],
            do: :telemetry.detach({id, event})
      end)
    end

    test "stop events carry fuel and duration; traps emit a recycle", %{component: c} do
      pid = start_instance(c)
      assert {:ok, _} = Capsid.call(pid, "burn", [10_000])

      assert_receive {[:capsid, :call, :stop], %{fuel: fuel, duration: d},
                      %{instance: ^pid, function: "burn", result: :ok}}

      assert fuel > 10_000 and d > 0

      {:error, _} = Capsid.call(pid, "hit-unreachable", [])

      assert_receive {[:capsid, :call, :stop], _,
                      %{instance: ^pid, result: {:trap, %Trap{kind: :unreachable}}}}

      assert_receive {[:capsid, :instance, :recycle], %{count: 1},
                      %{instance: ^pid, reason: :unreachable}}
    end
  end
end
