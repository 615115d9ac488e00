# Instances as cheap as processes (issue 9): lifecycle, lifecycle among
# 50,000 idle processes, the Elixir import round trip, trivial calls on two
# instances at once, and how often Capsid's ticker thread wakes on an idle
# node. Every figure has its floor measured in the same run.
#
#     mix run bench/density.exs
#
# Memory per live instance at 100,000 instances is bench/instances.exs.

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Baseline, Measure, Report}

defmodule Capsid.Bench.Density do
  @moduledoc false

  alias Capsid.Bench.Baseline

  defmodule Empty do
    @moduledoc false
    use GenServer
    def init(state), do: {:ok, state}
  end

  # `n` empty GenServer start + stop cycles: the floor of a lifecycle.
  def genserver(0), do: :ok

  def genserver(n) do
    {:ok, pid} = GenServer.start_link(Empty, nil)
    :ok = GenServer.stop(pid)
    genserver(n - 1)
  end

  # `n` instance start + first call + stop cycles.
  def lifecycle(_component, 0), do: :ok

  def lifecycle(component, n) do
    {:ok, pid} = Capsid.Instance.start_link(component: component)
    {:ok, 3} = Capsid.call(pid, "add", [1, 2])
    :ok = GenServer.stop(pid)
    lifecycle(component, n - 1)
  end

  def calls(_pid, _fun, _arg, 0), do: :ok

  def calls(pid, fun, arg, n) do
    {:ok, _} = Capsid.call(pid, fun, [arg])
    calls(pid, fun, arg, n - 1)
  end

  # Instantiation alone, `n` times: `{create_ns, instantiate_ns}` each. The
  # instance is created (options checked, imports linked), then its guest
  # instantiated; each is dropped and collected before the next, so that
  # its memory slot is reused as in a start/stop loop. There is no public
  # call for this step alone (`Instance.start_link/1` adds the process and
  # the registry), hence the two internal ones.
  def instantiations(component, n) do
    for _ <- 1..n do
      times = instantiate_once(component)
      :erlang.garbage_collect()
      times
    end
  end

  defp instantiate_once(component) do
    t0 = :erlang.monotonic_time(:nanosecond)
    {:ok, created} = Capsid.Instance.create(component: component)
    t1 = :erlang.monotonic_time(:nanosecond)
    :ok = Capsid.Call.warm(created.ref)
    {t1 - t0, :erlang.monotonic_time(:nanosecond) - t1}
  end

  def add(_pid, 0), do: :ok

  def add(pid, n) do
    {:ok, _} = Capsid.call(pid, "add", [n, 1])
    add(pid, n - 1)
  end

  # A compiled import (a fun defined in the script would be interpreted).
  def hook(x), do: x + 1

  def nif_add(0), do: :ok

  def nif_add(n) do
    _ = Baseline.add(n, 1)
    nif_add(n - 1)
  end

  @doc "Calls/s of `fun.(target)` run back to back by one process per target, for `ms`."
  def throughput(fun, targets, ms) do
    parent = self()
    start = :erlang.monotonic_time(:nanosecond) + 5_000_000
    deadline = start + ms * 1_000_000

    pids =
      for t <- targets do
        spawn_link(fn ->
          wait_until(start)
          n = loop(fun, t, deadline, 0)
          send(parent, {:done, self(), n, :erlang.monotonic_time(:nanosecond)})
        end)
      end

    results = for pid <- pids, do: receive(do: ({:done, ^pid, n, ended} -> {n, ended}))
    calls = results |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    ended = results |> Enum.map(&elem(&1, 1)) |> Enum.max()
    calls / ((ended - start) / 1.0e9)
  end

  defp wait_until(t) do
    if :erlang.monotonic_time(:nanosecond) < t, do: wait_until(t), else: :ok
  end

  # 100 calls between clock reads.
  defp loop(fun, target, deadline, n) do
    if :erlang.monotonic_time(:nanosecond) < deadline do
      fun.(target, 100)
      loop(fun, target, deadline, n + 100)
    else
      n
    end
  end

  @doc "The OS thread id of the thread named `name` in this OS process, or nil."
  def thread(name) do
    Path.wildcard("/proc/self/task/*/comm")
    |> Enum.find_value(fn comm ->
      if File.read!(comm) |> String.trim() == name, do: Path.dirname(comm)
    end)
  end

  @doc "Context switches (voluntary + involuntary) of a thread so far: one per wake-up."
  def switches(task) do
    status = File.read!(Path.join(task, "status"))

    for key <- ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"], reduce: 0 do
      acc ->
        [_, n] = Regex.run(~r/^#{key}:\s+(\d+)$/m, status)
        acc + String.to_integer(n)
    end
  end
end

alias Capsid.Bench.Density

Baseline.load()
component = Capsid.Component.load!(Capsid.Guests.path(:bench))
faulty = Capsid.Component.load!(Capsid.Guests.path(:faulty))

Report.header("Instances as cheap as processes")

median = fn mfa, per, opts -> Measure.sample(mfa, per, opts) |> Measure.median() end
us = fn ns -> :erlang.float_to_binary(ns / 1000, decimals: 1) end
x = fn a, b -> :erlang.float_to_binary(a / b, decimals: 2) <> "×" end

# -- lifecycle
lifecycle = fn ->
  gs = median.({Density, :genserver, [200]}, 200, samples: 30, max_ms: 3_000)
  life = median.({Density, :lifecycle, [component, 100]}, 100, samples: 30, max_ms: 5_000)
  {gs, life}
end

{gs, life} = lifecycle.()

# Inside a fun, so that the 50,000 pids are not kept in the script's binding.
{gs50, life50} =
  (fn ->
     idle =
       for _ <- 1..50_000 do
         spawn(fn ->
           receive do
             :stop -> :ok
           end
         end)
       end

     result = lifecycle.()
     Enum.each(idle, &send(&1, :stop))
     result
   end).()

IO.puts("""
## Lifecycle: `Instance.start_link` + first `add` + `GenServer.stop`

| what | median per cycle | ratio |
|---|---|---|
| empty GenServer start + stop (floor) | #{us.(gs)} µs | 1× |
| Capsid instance start + call + stop | #{us.(life)} µs | #{x.(life, gs)} the floor |
| the same, 50,000 idle processes on the node: GenServer | #{us.(gs50)} µs | #{x.(gs50, gs)} without them |
| the same, 50,000 idle processes on the node: Capsid | #{us.(life50)} µs | #{x.(life50, life)} without them |

Instantiation plus one call, the lifecycle less its GenServer floor: #{us.(life - gs)} µs.
""")

# -- import round trip, measured in a fresh process: the script's own heap
# holds the 50,000 pids above, and an inline import's garbage lands there.
{plain, hook, inline} =
  Task.async(fn ->
    {:ok, fi} = Capsid.Instance.start_link(component: faulty, imports: %{"hook" => &Density.hook/1})

    {:ok, fi_inline} =
      Capsid.Instance.start_link(
        component: faulty,
        imports: %{"hook" => {&Density.hook/1, inline: true}}
      )

    {median.({Density, :calls, [fi, "ok", 7, 1000]}, 1000, samples: 50),
     median.({Density, :calls, [fi, "call-hook", 7, 1000]}, 1000, samples: 50),
     median.({Density, :calls, [fi_inline, "call-hook", 7, 1000]}, 1000, samples: 50)}
  end)
  |> Task.await(:infinity)

IO.puts("""
## Elixir import round trip (guest → Elixir fun → guest)

| what | median per call | ratio |
|---|---|---|
| `ok(x)`: a trivial call of the same component | #{:erlang.float_to_binary(plain, decimals: 0)} ns | 1× |
| `call-hook(x)`: calls the Elixir import `hook(x)` once (its runner process) | #{:erlang.float_to_binary(hook, decimals: 0)} ns | #{x.(hook, plain)} |
| the same with `{fun, inline: true}` (in the calling process) | #{:erlang.float_to_binary(inline, decimals: 0)} ns | #{x.(inline, plain)} |
""")

# -- instantiation alone
_ = Density.instantiations(component, 500)
inst = Density.instantiations(component, 5_000)
create_ns = inst |> Enum.map(&elem(&1, 0)) |> Measure.median()
instantiate_ns = inst |> Enum.map(&elem(&1, 1)) |> Measure.median()

IO.puts("""
## Instantiation alone (the bench guest: 3 core modules, 17 core instances)

| step (5,000 times, each instance dropped before the next) | median |
|---|---|
| create: options checked, imports linked, the store's settings | #{us.(create_ns)} µs |
| instantiate: wasmtime's instantiation in a reused memory slot | #{us.(instantiate_ns)} µs |
""")

# -- two callers on two instances
{:ok, a} = Capsid.Instance.start_link(component: component)
{:ok, b} = Capsid.Instance.start_link(component: component)
capsid = fn pid, n -> Density.add(pid, n) end
nif = fn _, n -> Density.nif_add(n) end

rounds =
  for _ <- 1..5 do
    c1 = Density.throughput(capsid, [a], 1_000)
    c2 = Density.throughput(capsid, [a, b], 1_000)
    n1 = Density.throughput(nif, [nil], 1_000)
    n2 = Density.throughput(nif, [nil, nil], 1_000)
    {c2 / c1, n2 / n1, c1, c2}
  end

med = fn i -> rounds |> Enum.map(&elem(&1, i)) |> Measure.median() end

IO.puts("""
## Trivial calls scale: `add` on 1 instance, then 2 callers on 2 instances

| what | median of 5 one-second rounds |
|---|---|
| Capsid, 1 caller | #{round(med.(2))} calls/s |
| Capsid, 2 callers on 2 instances | #{round(med.(3))} calls/s |
| Capsid scaling, 2 callers / 1 | #{:erlang.float_to_binary(med.(0), decimals: 2)}× |
| plain NIF `add` scaling, 2 callers / 1 (floor) | #{:erlang.float_to_binary(med.(1), decimals: 2)}× |
""")

# -- idle wake-ups
ticker = Density.thread("capsid-epoch")

if ticker do
  {:ok, spin} =
    Capsid.Instance.start_link(
      component: faulty,
      imports: %{"hook" => & &1},
      fuel: :infinity,
      timeout: 2_000
    )

  s0 = Density.switches(ticker)
  t0 = System.monotonic_time(:millisecond)
  {:error, %Capsid.Trap{kind: :timeout}} = Capsid.call(spin, "spin", [])
  busy = (Density.switches(ticker) - s0) / ((System.monotonic_time(:millisecond) - t0) / 1000)

  # The ticker parks a little after the last poll; then count for 5 s.
  Process.sleep(500)
  s1 = Density.switches(ticker)
  Process.sleep(5_000)
  idle_rate = (Density.switches(ticker) - s1) / 5

  IO.puts("""
  ## Ticker thread (`capsid-epoch`) wake-ups per second

  | when | wake-ups/s |
  |---|---|
  | a guest spinning until its 2 s timeout | #{round(busy)} |
  | idle node (5 s, after the last call) | #{:erlang.float_to_binary(idle_rate, decimals: 1)} |
  """)
else
  IO.puts("(no capsid-epoch thread found: no /proc, or no call ran)\n")
end

IO.puts(Report.noise(started))
