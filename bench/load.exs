# Start-up costs: compiling a component (Capsid.Component.load/2, with the
# disk cache off), loading it from the compiled-code disk cache (a hit), and
# starting an instance (Capsid.Instance.start_link/1).
#
#     mix run bench/load.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Measure, Report}

defmodule Capsid.Bench.Load do
  @moduledoc false

  # `cache` is passed only when this Capsid has a compiled-code cache.
  def load(path, []), do: {:ok, _} = Capsid.Component.load(path)

  def load(path, cache: dir) do
    {:ok, component} = Capsid.Component.load(path, cache: dir)
    component
  end

  def instantiate(component, imports) do
    {:ok, pid} = Capsid.Instance.start_link(component: component, imports: imports)
    pid
  end

  @doc "Times `n` start_link calls; stops each instance outside the timing."
  def instantiate_times(component, imports, n) do
    for _ <- 1..n do
      t0 = :erlang.monotonic_time(:nanosecond)
      pid = instantiate(component, imports)
      t1 = :erlang.monotonic_time(:nanosecond)
      Process.unlink(pid)
      GenServer.stop(pid)
      t1 - t0
    end
  end

  def load_times(path, opts, n) do
    for _ <- 1..n do
      t0 = :erlang.monotonic_time(:nanosecond)
      load(path, opts)
      t1 = :erlang.monotonic_time(:nanosecond)
      # Drop the compiled code now, not at some later GC.
      :erlang.garbage_collect()
      t1 - t0
    end
  end

  @doc "Times `n` loads that must all be cache hits."
  def hit_times(path, dir, n) do
    for _ <- 1..n do
      t0 = :erlang.monotonic_time(:nanosecond)
      %{cache: :hit} = load(path, cache: dir)
      t1 = :erlang.monotonic_time(:nanosecond)
      :erlang.garbage_collect()
      t1 - t0
    end
  end
end

alias Capsid.Bench.Load

root = Capsid.Bench.Native.root()
toolkit = Capsid.Guests.path(:toolkit)
bench = Capsid.Guests.path(:bench)
python = Path.join(root, "test/fixtures/foreign/calc_py.wasm")
toolkit_imports = %{"log" => fn _, _ -> :ok end, "get-config" => fn _ -> nil end}

for path <- [toolkit, bench, python], not File.exists?(path) do
  raise "#{path} is missing (run `mix compile`)"
end

mb = fn path -> Report.f(File.stat!(path).size / 1.0e6, 1) <> " MB" end

# Does this Capsid have the compiled-code disk cache (`load/2`'s `:cache`)?
cached? = Map.has_key?(Capsid.Component.__struct__(), :cache)
# Compile rows bypass the cache; hit rows use a private, fresh cache dir.
no_cache = if cached?, do: [cache: false], else: []

cache_dir = Path.join(System.tmp_dir!(), "capsid-bench-cache-#{System.unique_integer([:positive])}")

# Warm-up: the engine (and its epoch thread) start on first use.
Load.load(bench, no_cache)

load_rows = [
  {"toolkit.wasm (Rust)", toolkit, 10},
  {"bench.wasm (Rust)", bench, 10},
  {"calc_py.wasm (componentize-py, CPython 3.14)", python, 5}
]

load_results =
  for {name, path, n} <- load_rows do
    ns = Load.load_times(path, no_cache, n)
    {name, mb.(path), Measure.stats(ns)}
  end

hit_results =
  if cached? do
    try do
      for {name, path, n} <- load_rows do
        # The first load compiles and stores; every timed one must be a hit.
        %{cache: :miss} = Load.load(path, cache: cache_dir)
        _ = Load.hit_times(path, cache_dir, 2)
        {name, mb.(path), Measure.stats(Load.hit_times(path, cache_dir, n * 2))}
      end
    after
      File.rm_rf!(cache_dir)
    end
  end

toolkit_c = Capsid.Component.load!(toolkit, no_cache)
bench_c = Capsid.Component.load!(bench, no_cache)
python_c = Capsid.Component.load!(python, no_cache)

inst_rows = [
  {"toolkit (with its two Elixir imports)", toolkit_c, toolkit_imports, 200},
  {"bench (WASI only)", bench_c, %{}, 200},
  {"calc_py (WASI only)", python_c, %{}, 30}
]

inst_results =
  for {name, c, imports, n} <- inst_rows do
    # Warm-up: a few instances first.
    _ = Load.instantiate_times(c, imports, 3)
    {name, Measure.stats(Load.instantiate_times(c, imports, n))}
  end

Report.header("Start-up: compile and instantiate")

IO.puts("""
Compile = `Capsid.Component.load(path#{if cached?, do: ", cache: false"})`: read
the file, validate, compile with Cranelift (wasmtime's parallel compilation,
on a dirty CPU scheduler), extract the types. Every such load compiles afresh.
#{if cached?, do: "Cache hit = `Capsid.Component.load(path, cache: dir)` when `dir` already holds the\ncompiled code (a fresh temporary directory, filled by one load first): read,\nhash, authenticate and deserialize instead of compiling; page cache warm.\n", else: ""}Instantiate = `Capsid.Instance.start_link(component: c, imports: ...)`:
link, instantiate (including the component's start-up code) and start the
process.
""")

row = fn label, name, size, s ->
  [label, name, size, Report.dur(s.median), Report.dur(s.min), Report.dur(s.max), s.n]
end

rows = for {name, size, s} <- load_results, do: row.("compile", name, size, s)

rows =
  case hit_results do
    nil ->
      rows ++ [["cached load", "(compiled-code disk cache)", "", "not implemented yet", "", "", ""]]

    hits ->
      rows ++ for {name, size, s} <- hits, do: row.("cache hit", name, size, s)
  end

IO.puts(
  Report.table(
    ["load", "component", "size", "median", "min", "max", "runs"],
    rows,
    [:left, :left, :right, :right, :right, :right, :right]
  )
)

if hit_results do
  for {{name, _, compile}, {_, _, hit}} <- Enum.zip(load_results, hit_results) do
    IO.puts(
      "- #{name}: cache hit #{Report.ratio(compile.median / hit.median, 0)} faster than compiling"
    )
  end

  IO.puts("")
end

rows =
  for {name, s} <- inst_results do
    [name, Report.dur(s.median), Report.dur(s.p99), Report.dur(s.min), s.n]
  end

IO.puts(Report.table(["instantiate", "median", "p99", "min", "runs"], rows))

Report.noise(started)
