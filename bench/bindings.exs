# Compile time of `use Capsid.Bindings` against the number of exports
# (issue 23, item 13): the bindings of a component with N root exports
# (`Capsid.Hostile.many_exports/1`), compiled in this VM, for a few N. Linear
# generation doubles the time when N doubles; the ratio printed for each
# doubling says how far from that it is (4 is quadratic).
#
#     MIX_ENV=test mix run bench/bindings.exs [N ...]    (default: 250 500 1000 2000)
sizes =
  case System.argv() do
    [] -> [250, 500, 1000, 2000]
    args -> Enum.map(args, &String.to_integer/1)
  end

dir = Path.join(System.tmp_dir!(), "capsid-bench-bindings-#{System.unique_integer([:positive])}")
File.mkdir_p!(dir)
# Each size's names are new atoms; enough room for the largest.
Application.put_env(:capsid, :max_atoms_per_component, 100_000)
Application.put_env(:capsid, :max_atoms_total, 1_000_000)

results =
  for n <- sizes do
    wasm = Path.join(dir, "many_#{n}.wasm")
    File.write!(wasm, Capsid.Hostile.many_exports(n))

    code =
      "defmodule CapsidBenchBindings#{n} do\n use Capsid.Bindings, component: #{inspect(wasm)}\nend"

    {cpu0, _} = :erlang.statistics(:runtime)
    {wall, _} = :timer.tc(fn -> Code.compile_string(code) end)
    {cpu1, _} = :erlang.statistics(:runtime)
    IO.puts("#{n} exports: #{div(wall, 1000)} ms wall, #{cpu1 - cpu0} ms CPU")
    {n, cpu1 - cpu0}
  end

for [{n1, t1}, {n2, t2}] <- Enum.chunk_every(results, 2, 1, :discard) do
  IO.puts(
    "#{n1} -> #{n2} exports: CPU x#{Float.round(t2 / max(t1, 1), 2)} for x#{Float.round(n2 / n1, 2)}"
  )
end

File.rm_rf(dir)
