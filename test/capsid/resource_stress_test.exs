defmodule Capsid.ResourceStressTest do
  # Not async: it measures the whole VM's memory.
  use ExUnit.Case, async: false

  alias Capsid.Resource

  @moduletag :stress

  defp rss do
    [_size, resident | _] = File.read!("/proc/self/statm") |> String.split()
    String.to_integer(resident) * 4096
  end

  test "100,000 create/drop cycles: every object is dropped, memory stays flat" do
    c = Capsid.Component.load!(Capsid.Guests.path(:res))
    pid = start_supervised!({Capsid.Instance, component: c})
    base = Capsid.call!(pid, "live", [])

    cycle = fn n ->
      for _ <- 1..n do
        {:ok, cart} = Capsid.call(pid, "[constructor]cart", ["x"])
        :ok = Resource.drop(cart)
      end

      :erlang.garbage_collect()
    end

    # Warm up (allocator pools, the guest's own heap), then measure.
    cycle.(10_000)
    {vm, os} = {:erlang.memory(:total), rss()}
    cycle.(90_000)
    assert Capsid.call!(pid, "live", []) == base
    # A leak of even 64 bytes per cycle would be 5.8 MB.
    grown_vm = :erlang.memory(:total) - vm
    grown_os = rss() - os
    assert grown_vm < 5_000_000, "the VM's memory grew by #{grown_vm} bytes"
    assert grown_os < 5_000_000, "the OS process grew by #{grown_os} bytes"
    assert %{recycles: 0} = Capsid.Instance.info(pid)
  end

  test "100,000 host resources made, used and dropped by the guest: memory stays flat" do
    c = Capsid.Component.load!(Capsid.Guests.path(:ledger))
    counter = :counters.new(2, [])

    imports = %{
      "[constructor]ledger" => fn name -> {:ledger, name} end,
      "[static]ledger.open" => fn name -> {:ledger, name} end,
      "[method]ledger.record" => fn _, _ -> 1 end,
      "[method]ledger.name" => fn {:ledger, name} -> name end,
      "[resource-drop]ledger" => fn {:ledger, _} -> :counters.add(counter, 1, 1) end,
      "archive" => fn _ -> nil end,
      "find" => fn _ -> nil end
    }

    pid = start_supervised!({Capsid.Instance, component: c, imports: imports})

    # Each call makes a ledger, records in it and drops it: three imports.
    cycle = fn n ->
      for _ <- 1..n, do: {:ok, 1} = Capsid.call(pid, "scratch", ["x", ["e"]])
      :erlang.garbage_collect()
    end

    cycle.(10_000)
    {vm, os} = {:erlang.memory(:total), rss()}
    cycle.(90_000)
    assert :counters.get(counter, 1) == 100_000
    grown_vm = :erlang.memory(:total) - vm
    grown_os = rss() - os
    assert grown_vm < 5_000_000, "the VM's memory grew by #{grown_vm} bytes"
    assert grown_os < 5_000_000, "the OS process grew by #{grown_os} bytes"
    assert %{recycles: 0} = Capsid.Instance.info(pid)
  end
end
