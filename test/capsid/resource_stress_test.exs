defmodule Capsid.ResourceStressTest do
  # Not async: it measures the whole VM's memory.
  use ExUnit.Case, async: false

  alias Capsid.Resource

  @moduletag :stress

  defp rss do
    [_size, resident | _] = File.read!("/proc/self/statm") |> String.split()
    String.to_integer(resident) * 4096
  end

  # Runs `cycle` twice (45,000 cycles each) after a warm-up and checks that
  # neither the VM's memory nor the OS process grew in *both* halves: a leak
  # grows in each (64 bytes a cycle would be 2.9 MB per half), while memory
  # that something else on the node takes once (the suite's other work, an
  # allocator growing a pool) shows in one half at most.
  defp assert_flat(cycle) do
    cycle.(10_000)
    at0 = {:erlang.memory(:total), rss()}
    cycle.(45_000)
    at1 = {:erlang.memory(:total), rss()}
    cycle.(45_000)
    at2 = {:erlang.memory(:total), rss()}

    for {what, i} <- [{"the VM's memory", 0}, {"the OS process", 1}] do
      first = elem(at1, i) - elem(at0, i)
      second = elem(at2, i) - elem(at1, i)

      assert min(first, second) < 2_500_000,
             "#{what} grew by #{first} then #{second} bytes over 45,000 cycles each"
    end
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

    assert_flat(cycle)
    assert Capsid.call!(pid, "live", []) == base
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

    assert_flat(cycle)
    assert :counters.get(counter, 1) == 100_000
    assert %{recycles: 0} = Capsid.Instance.info(pid)
  end
end
