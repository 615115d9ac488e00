defmodule Capsid.SchedulerTest do
  @moduledoc """
  Large values never hold a normal scheduler: converting arguments, results,
  import arguments and import answers of millions of elements runs on dirty
  schedulers (or is paused into them), so a heartbeat process keeps beating
  and `:erlang.system_monitor/2` sees no long schedule from the caller.
  Not async: these measure the whole VM.
  """
  use ExUnit.Case, async: false

  import Capsid.TestHelpers, only: [wait_until: 2]

  alias Capsid.Instance

  @moduletag timeout: 300_000

  setup_all do
    %{bulk: Capsid.Component.load!(Capsid.Guests.path(:bulk))}
  end

  defp start(c, imports) do
    start_supervised!(
      Supervisor.child_spec(
        {Instance,
         component: c, imports: imports, max_memory: 2 * 1024 * 1024 * 1024, timeout: 120_000},
        id: make_ref()
      )
    )
  end

  # Runs `fun` in a caller process while a system monitor watches for long
  # schedules; returns the long schedules (ms) of the caller and of its
  # import runner that Capsid is to blame for, and `fun`'s result.
  #
  # The VM's own garbage collection of the test's millions of elements is
  # not Capsid's: `long_gc` events are watched too, and the collections a
  # process spent since its previous long schedule are taken off the next
  # one (they arrive in order: both are reported by the thread that runs
  # the process). Schedules reported with neither `in` nor `out` (work done
  # off the normal schedulers, as a dirty NIF's) are not counted either.
  # The OS preempting a scheduler thread also shows up as a long schedule
  # on a loaded machine, so each case gets five attempts; guest data held
  # on a scheduler would fail every one (it took seconds before).
  defp watched(fun, attempts \\ 5) do
    test = self()

    caller =
      Task.async(fn ->
        settle_heap()
        send(test, :settled)
        result = receive(do: (:go -> fun.()))
        {result, Process.get({Capsid.Imports, :runner})}
      end)

    receive(do: (:settled -> :ok))
    :erlang.system_monitor(self(), [{:long_schedule, 40}, {:long_gc, 5}])
    send(caller.pid, :go)
    {result, runner} = Task.await(caller, 120_000)
    :erlang.system_monitor(:undefined)
    watched = [caller.pid | if(runner, do: [elem(runner, 0)], else: [])]
    long = capsid_schedules(Enum.reverse(drain()), watched)
    if long != [] and attempts > 1, do: watched(fun, attempts - 1), else: {long, result}
  end

  # The long schedules (ms) of `pids` once the collections that preceded
  # them are taken off, among `events` in the order they arrived.
  defp capsid_schedules(events, pids) do
    {long, _gc} =
      Enum.reduce(events, {[], %{}}, fn
        {:monitor, pid, :long_gc, info}, {long, gc} ->
          {long, Map.update(gc, pid, info[:timeout], &(&1 + info[:timeout]))}

        {:monitor, pid, :long_schedule, info}, {long, gc} ->
          {spent, gc} = Map.pop(gc, pid, 0)
          ms = info[:timeout] - spent
          off_scheduler = info[:in] == :undefined and info[:out] == :undefined

          if pid in pids and ms >= 40 and not off_scheduler,
            do: {[{ms, info[:in], info[:out]} | long], gc},
            else: {long, gc}

        _, acc ->
          acc
      end)

    Enum.reverse(long)
  end

  # A caller spawned with millions of elements holds them on its young
  # heap, and its first minor collection copies them all (174 ms for 10
  # million on this machine, inside whatever function runs then): the VM's
  # work on the test's data, not Capsid's. A major then a minor collection
  # move them to the old heap, which later minor collections leave alone.
  defp settle_heap do
    :erlang.garbage_collect()
    :erlang.garbage_collect(self(), type: :minor)
  end

  defp wrap(true, fun), do: {fun, inline: true}
  defp wrap(false, fun), do: fun

  defp drain(acc \\ []) do
    receive do
      {:monitor, _, _, _} = m -> drain([m | acc])
    after
      50 -> acc
    end
  end

  test "a result of 2.7 million option<u8>", %{bulk: c} do
    pid = start(c, %{"fetch" => fn _ -> [] end, "send" => &length/1})
    {long, result} = watched(fn -> Capsid.call(pid, "options", [2_700_000]) end)
    assert {:ok, items} = result
    assert length(items) == 2_700_000
    assert Enum.at(items, 6) == nil and Enum.at(items, 7) == 7
    assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
  end

  test "an argument of 10 million elements", %{bulk: c} do
    pid = start(c, %{"fetch" => fn _ -> [] end, "send" => &length/1})
    items = List.duplicate(1, 10_000_000)
    {long, result} = watched(fn -> Capsid.call(pid, "sum-options", [items]) end)
    assert result == {:ok, 10_000_000}
    assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
  end

  # An inline import gets its arguments with the call's status when they
  # are small; large ones go the runner's way (taken on a dirty scheduler),
  # and so does a large answer.
  for inline <- [false, true] do
    @inline inline
    @what if inline, do: "an inline import", else: "an import"

    test "#{@what} answering 5 million elements", %{bulk: c} do
      answer = List.duplicate(2, 5_000_000)

      pid =
        start(c, %{"fetch" => wrap(@inline, fn _ -> answer end), "send" => wrap(@inline, &length/1)})

      {long, result} = watched(fn -> Capsid.call(pid, "call-fetch", [5_000_000]) end)
      assert result == {:ok, 10_000_000}
      assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
    end

    # Its message is cut to a few KiB before it is copied anywhere.
    test "#{@what} raising with a 50 MB message", %{bulk: c} do
      big = String.duplicate("x", 50_000_000)

      pid =
        start(c, %{
          "fetch" => wrap(@inline, fn _ -> raise big end),
          "send" => wrap(@inline, &length/1)
        })

      {long, result} = watched(fn -> Capsid.call(pid, "call-fetch", [1]) end)
      assert {:error, %Capsid.Trap{kind: :import_failed, message: message}} = result
      assert byte_size(message) < 4_200
      assert message =~ ~r/… \d+ bytes more$/
      assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
    end

    test "#{@what} given 5 million elements", %{bulk: c} do
      pid =
        start(c, %{"fetch" => wrap(@inline, fn _ -> [] end), "send" => wrap(@inline, &length/1)})

      {long, result} = watched(fn -> Capsid.call(pid, "call-send", [5_000_000]) end)
      assert result == {:ok, 5_000_000}
      assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
    end
  end

  # Compiling a large component takes seconds. It used to hold a dirty
  # scheduler for all of it: two compiles took both, and a call whose
  # large value must convert on one waited for them while holding its
  # instance (a hot swap's snapshot: callers queued behind it gave up).
  test "compiles hold no dirty scheduler: calls and loads go on meanwhile", %{bulk: c} do
    bytes = File.read!(Path.expand("../fixtures/foreign/calc_py.wasm", __DIR__))
    Capsid.Component.load!(Capsid.Guests.path(:toolkit))
    compiles = for _ <- 1..2, do: Task.async(fn -> Capsid.Component.load(bytes, cache: false) end)
    wait_until(fn -> Capsid.info().compiling == 2 end, 5_000)

    pid = start(c, %{"fetch" => fn _ -> [] end, "send" => &length/1})
    assert {:ok, items} = Capsid.call(pid, "options", [1_000_000])
    assert length(items) == 1_000_000
    # From the cache (it was put there before the compiles started): a
    # load that needs compiling waits for a compile slot, by design.
    assert {:ok, %{cache: :hit}} = Capsid.Component.load(Capsid.Guests.path(:toolkit))

    assert Capsid.info().compiling == 2,
           "the call and the load waited for a compile to finish"

    for t <- compiles, do: assert({:ok, _} = Task.await(t, 120_000))
  end

  # A host resource's state is any term the caller gives: a huge or deeply
  # nested one is copied on a dirty scheduler, both ways.
  test "host resource states of 3 million elements and nested a million deep" do
    c = Capsid.Component.load!(Capsid.Guests.path(:ledger))

    imports = %{
      "[constructor]ledger" => fn name -> name end,
      "[static]ledger.open" => fn name -> name end,
      "[method]ledger.record" => fn _, _ -> 1 end,
      "[method]ledger.name" => fn _ -> "big" end,
      "archive" => fn _ -> nil end,
      "find" => fn _ -> nil end
    }

    pid = start(c, imports)
    wide = List.duplicate(7, 3_000_000)
    deep = Enum.reduce(1..1_000_000, :leaf, fn _, acc -> {acc} end)

    for state <- [wide, deep] do
      # Borrowed by an export, then lent to an import (the method's self).
      {long, result} = watched(fn -> Capsid.call(pid, "audit", [state, "e"]) end)
      assert result == {:ok, 1}
      assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
      # Given to the guest and back: the same term.
      {long, result} = watched(fn -> Capsid.call(pid, "label", [state, "x"]) end)
      assert {:ok, %{book: ^state}} = result
      assert long == [], "Capsid held a scheduler ({ms, in, out}): #{inspect(long)}"
    end
  end
end
