defmodule Capsid.DensityTest do
  @moduledoc """
  Instances as cheap as processes: 100,000 live instances on one node with
  the kernel's default settings, each called once, in a few tens of KiB
  each and a few hundred memory mappings in all. Not async: it measures
  the whole OS process.
  """
  use ExUnit.Case, async: false

  @n 100_000

  defp rss_bytes do
    [_, kb] = Regex.run(~r/VmRSS:\s+(\d+) kB/, File.read!("/proc/self/status"))
    String.to_integer(kb) * 1024
  end

  defp mappings, do: File.read!("/proc/self/maps") |> String.split("\n", trim: true) |> length()

  # Starts `n` instances linked to the caller, calling each once.
  defp start_many(component, n) do
    for i <- 1..n do
      {:ok, pid} = Capsid.Instance.start_link(component: component)
      assert {:ok, ^i} = Capsid.call(pid, "add", [i - 1, 1])
      pid
    end
  end

  test "an instance's process does not hold its component's type information" do
    # The probe imports 101 WASI functions: its type information is ~140 KB
    # as terms, and each instance process used to hold a copy (230 KB).
    component = Capsid.Component.load!(Capsid.Guests.path(:probe))
    assert length(component.imports) > 100
    {:ok, pid} = Capsid.Instance.start_link(component: component)
    :erlang.garbage_collect(pid)
    {:memory, bytes} = Process.info(pid, :memory)
    assert bytes < 16 * 1024, "instance process: #{bytes} bytes"
    assert %{hash: hash, limits: %{timeout: 5_000}} = Capsid.Instance.info(pid)
    assert hash == component.hash
  end

  @tag :stress
  @tag timeout: 900_000
  test "100,000 live instances, each called once, at most 64 KiB each" do
    # Each instance's linear memory is 1.1 MiB (a Rust guest's stack and
    # data), 110 GB for all of them: more than the node's memory budget
    # (physical memory) allows by default, although they touch a few KiB
    # each. A node meant for this many raises the budget.
    Capsid.Budget.configure(max_memory_total: 256 * 1024 * 1024 * 1024)
    on_exit(fn -> Capsid.Budget.configure(max_memory_total: :default) end)
    component = Capsid.Component.load!(Capsid.Guests.path(:bench))
    # Warm: the first instance sets up the shared arenas and the ticker.
    [first] = start_many(component, 1)
    :erlang.garbage_collect()
    rss0 = rss_bytes()
    maps0 = mappings()

    pids = start_many(component, @n)

    per_instance = div(rss_bytes() - rss0, @n)
    new_mappings = mappings() - maps0

    # Every one of them is alive and still answers.
    assert Enum.all?(pids, &Process.alive?/1)
    assert {:ok, 42} = Capsid.call(List.last(pids), "add", [40, 2])
    assert {:ok, 42} = Capsid.call(hd(pids), "add", [40, 2])

    for pid <- [first | pids] do
      Process.unlink(pid)
      GenServer.stop(pid)
    end

    # RSS counts everything: the BEAM process and its heap, the store, the
    # guest's touched pages. The kernel's default vm.max_map_count is 65,530.
    assert per_instance <= 64 * 1024,
           "#{per_instance} bytes per instance (#{@n} instances)"

    assert new_mappings < 2_000, "#{new_mappings} new mappings for #{@n} instances"

    # The node is usable afterwards.
    [again] = start_many(component, 1)
    GenServer.stop(again)
  end
end
