# Hot swap: how long from Capsid.deploy/3 being called to the first call
# served by the new version, with the new version in the compiled-code cache
# and without; and calls/s while swapping every 100 ms vs steady state.
#
#     mix run bench/swap.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Measure, Report}

defmodule Capsid.Bench.Swap do
  @moduledoc false

  @v1 Capsid.Guests.path(:greeter_v1)
  @v2 Capsid.Guests.path(:greeter_v2)

  # ns from the deploy call to the first reply from `version`.
  def swap_latency(name, path, version, opts) do
    t0 = :erlang.monotonic_time(:nanosecond)
    {:ok, _} = Capsid.deploy(name, path, opts)
    wait_for(name, version)
    :erlang.monotonic_time(:nanosecond) - t0
  end

  defp wait_for(name, version) do
    case Capsid.call(name, "version", []) do
      {:ok, ^version} -> :ok
      _ -> wait_for(name, version)
    end
  end

  # Swaps v1 <-> v2 `n` times; `cache` is passed to every deploy.
  def latencies(name, n, cache) do
    for i <- 1..n do
      {path, version} = if rem(i, 2) == 1, do: {@v2, 2}, else: {@v1, 1}
      swap_latency(name, path, version, cache: cache.(i))
    end
  end

  # Calls/s of `callers` processes over `ms`, while `during` runs.
  def throughput(name, callers, ms, during) do
    stop = :atomics.new(1, [])
    parent = self()

    pids =
      for _ <- 1..callers do
        spawn_link(fn ->
          n = count(name, stop, 0)
          send(parent, {:count, n})
        end)
      end

    t0 = System.monotonic_time(:millisecond)
    during.(t0 + ms)
    Process.sleep(max(t0 + ms - System.monotonic_time(:millisecond), 0))
    :atomics.put(stop, 1, 1)
    elapsed = System.monotonic_time(:millisecond) - t0

    total =
      Enum.reduce(pids, 0, fn _, acc ->
        receive do
          {:count, n} -> acc + n
        end
      end)

    total * 1000 / elapsed
  end

  defp count(name, stop, n) do
    if :atomics.get(stop, 1) == 1 do
      n
    else
      {:ok, _} = Capsid.call(name, "hello", ["Ada"])
      count(name, stop, n + 1)
    end
  end

  def swap_every(name, interval, until) do
    Stream.iterate(1, &(&1 + 1))
    |> Enum.reduce_while(0, fn i, swaps ->
      if System.monotonic_time(:millisecond) + interval > until do
        {:halt, swaps}
      else
        Process.sleep(interval)
        {:ok, _} = Capsid.deploy(name, if(rem(i, 2) == 1, do: @v2, else: @v1))
        {:cont, swaps + 1}
      end
    end)
  end

  def v1, do: @v1
end

alias Capsid.Bench.Swap

Report.header("Hot swap (greeter v1 <-> v2, deployment of 2 instances)")
name = :bench_swap
cache_dir = Path.join(System.tmp_dir!(), "capsid-bench-swap-#{System.os_time()}")
{:ok, _} = Capsid.deploy(name, Swap.v1(), size: 2, cache: cache_dir)

# Warm the cache with both versions, then measure.
Swap.latencies(name, 4, fn _ -> cache_dir end)
cached = Swap.latencies(name, 30, fn _ -> cache_dir end)
uncached = Swap.latencies(name, 10, fn i -> Path.join(cache_dir, "cold-#{i}") end)

ms = fn ns -> Float.round(ns / 1.0e6, 2) end

IO.puts(
  Report.table(
    ["swap (deploy call → first call served by the new version)", "median ms", "p90 ms", "n"],
    [
      [
        "new version in the compiled-code cache",
        ms.(Measure.median(cached)),
        ms.(Measure.percentile(cached, 90)),
        length(cached)
      ],
      [
        "new version not cached (compiles)",
        ms.(Measure.median(uncached)),
        ms.(Measure.percentile(uncached, 90)),
        length(uncached)
      ]
    ]
  )
)

# Throughput: 4 callers, 3 s steady, then 3 s swapping every 100 ms.
steady = Enum.map(1..3, fn _ -> Swap.throughput(name, 4, 3_000, fn _ -> :ok end) end)

swapping =
  Enum.map(1..3, fn _ ->
    Swap.throughput(name, 4, 3_000, fn until -> Swap.swap_every(name, 100, until) end)
  end)

steady_m = Measure.median(steady)
swapping_m = Measure.median(swapping)

IO.puts(
  Report.table(
    ["4 callers, `hello`", "calls/s (median of 3 × 3 s)", "vs steady"],
    [
      ["steady state", Report.int(steady_m), "100%"],
      [
        "swapping v1 ⇄ v2 every 100 ms",
        Report.int(swapping_m),
        "#{round(swapping_m / steady_m * 100)}%"
      ]
    ]
  )
)

:ok = Capsid.undeploy(name)
File.rm_rf!(cache_dir)
Report.noise(started)
