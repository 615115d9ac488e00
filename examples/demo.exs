# Capsid demo: `make demo` (or `mix run examples/demo.exs` once built).
# Loads the example guest (guest/toolkit, WIT in wit/toolkit), shows its
# interface, makes a few calls with structured values, and shows what a bad
# argument looks like.

alias Capsid.Component

# Typed bindings, generated from the component itself at compile time: a
# module per exported interface, a function (with @spec and @doc) per export.
defmodule Toolkit do
  use Capsid.Bindings, component: Capsid.Guests.path(:toolkit)
end

section = fn title -> IO.puts("\n\e[1m== #{title}\e[0m") end

show = fn label, value ->
  IO.puts(
    "  #{label}\n    => #{inspect(value, pretty: true, width: 90) |> String.replace("\n", "\n       ")}"
  )
end

# `n` processes calling `fun` without pause; the function returned stops
# them and gives the tally of their results (result => count).
call_streams = fn n, fun ->
  stop = :atomics.new(1, [])

  tasks =
    for _ <- 1..n do
      Task.async(fn ->
        Stream.repeatedly(fun)
        |> Enum.reduce_while(%{}, fn result, acc ->
          acc = Map.update(acc, result, 1, &(&1 + 1))
          if :atomics.get(stop, 1) == 1, do: {:halt, acc}, else: {:cont, acc}
        end)
      end)
    end

  fn ->
    :atomics.put(stop, 1, 1)

    tasks
    |> Enum.map(&Task.await(&1, 30_000))
    |> Enum.reduce(%{}, &Map.merge(&1, &2, fn _, a, b -> a + b end))
  end
end

path = Capsid.Guests.path(:toolkit)
{micros, component} = :timer.tc(fn -> Component.load!(path) end)

section.("Loaded #{Path.relative_to_cwd(path)}")
IO.puts("  #{inspect(component)} compiled in #{div(micros, 1000)} ms")

section.("Exports (callable names and WIT types)")

component
|> Component.exports(named: true)
|> Enum.reject(&String.contains?(&1.name, "#echo-"))
|> Enum.each(&IO.puts("  " <> Component.signature(&1)))

IO.puts(
  "  ... and #{Enum.count(Component.exports(component), &String.contains?(&1.name, "#echo-"))} echo-* round-trip functions"
)

section.("The pricing interface as WIT, with its type names (Component.describe/1)")

component
|> Component.describe!()
|> String.split("interface pricing {")
|> Enum.at(1)
|> String.split("\n  }")
|> hd()
|> String.split("\n")
|> Enum.reject(&(&1 == ""))
|> Enum.each(&IO.puts(String.replace_prefix(&1, "  ", "")))

section.("Imports the host must provide (Component.host_imports/1; WASI is Capsid's)")

component
|> Component.imports(named: true)
|> Enum.reject(&String.starts_with?(&1.name, "wasi:"))
|> Enum.each(&IO.puts("  " <> Component.signature(&1)))

imports = %{
  "log" => fn level, msg -> IO.puts("  [guest #{level}] #{msg}") end,
  "get-config" => fn
    "greeting" -> "Bonjour"
    _ -> nil
  end
}

{:ok, instance} = Capsid.Instance.start_link(component: component, imports: imports)

section.("Calls")
show.(~s|Toolkit.add(instance, 1, 2)|, Toolkit.add(instance, 1, 2))

show.(
  ~s|Capsid.call(instance, "add", [1, 2])  # the same call, untyped|,
  Capsid.call(instance, "add", [1, 2])
)

show.(
  ~s|Toolkit.greet(instance, "Zoë")  # calls the Elixir imports|,
  Toolkit.greet(instance, "Zoë")
)

show.(
  ~s|Toolkit.Text.analyze(instance, "The quick brown fox jumps over the lazy dog")|,
  Toolkit.Text.analyze(instance, "The quick brown fox jumps over the lazy dog")
)

show.(
  ~s|Toolkit.Text.slugify!(instance, "Crème Brûlée à la carte!")  # ! returns the value|,
  Toolkit.Text.slugify!(instance, "Crème Brûlée à la carte!")
)

items = [
  %{sku: "book", quantity: 3, unit_price_cents: 1_500, tags: [:taxable, :discountable]},
  %{sku: "vase", quantity: 1, unit_price_cents: 4_000, tags: [:taxable, :fragile]},
  %{sku: "ebook", quantity: 1, unit_price_cents: 999, tags: [:digital, :discountable]}
]

IO.puts(
  "  items = #{inspect(items, pretty: true, width: 90) |> String.replace("\n", "\n          ")}"
)

show.(
  ~s|Toolkit.Pricing.quote(instance, items, {:buy_x_get_y, {2, 1}}, :eur)|,
  Toolkit.Pricing.quote(instance, items, {:buy_x_get_y, {2, 1}}, :eur)
)

show.(
  ~s|Toolkit.Pricing.divide(instance, 10, 0)  # the guest's own result<s64, string>|,
  Toolkit.Pricing.divide(instance, 10, 0)
)

section.("Bad input is a clear error, and the instance carries on")
bad_items = [%{sku: "book", quantity: "three", unit_price_cents: 1_500, tags: []}]
{:error, error} = Toolkit.Pricing.quote(instance, bad_items, :none, :eur)

show.(
  ~s|Toolkit.Pricing.quote(instance, [%{sku: "book", quantity: "three", ...}], :none, :eur)|,
  error
)

IO.puts("    message: #{Exception.message(error)}")
{:error, error} = Toolkit.Pricing.quote(instance, items, :none, :yen)

IO.puts(
  "  Toolkit.Pricing.quote(instance, items, :none, :yen)\n    message: #{Exception.message(error)}"
)

{:error, error} = Capsid.call(instance, "describe", [])
IO.puts("  Capsid.call(instance, \"describe\", [])\n    message: #{Exception.message(error)}")
{:error, error} = Capsid.call(instance, "word_frequency", ["a b", 1])

IO.puts(
  "  Capsid.call(instance, \"word_frequency\", [\"a b\", 1])\n    message: #{Exception.message(error)}"
)

show.(~s|Capsid.call(instance, "add", [2, 2])  # still fine|, Capsid.call(instance, "add", [2, 2]))

info = Capsid.Instance.info(instance)

IO.puts(
  "\n  instance info: calls=#{info.calls} fuel_used=#{info.fuel_used} recycles=#{info.recycles}"
)

section.("Runaway guests are stopped, and the VM carries on")
faulty = Component.load!(Capsid.Guests.path(:faulty))
hook = %{"hook" => & &1}
{:ok, fueled} = Capsid.Instance.start_link(component: faulty, imports: hook, fuel: 200_000_000)

{:ok, timed} =
  Capsid.Instance.start_link(component: faulty, imports: hook, fuel: :infinity, timeout: 300)

ticker = Task.async(fn -> Enum.reduce(1..40, 0, fn _, n -> Process.sleep(10) && n + 1 end) end)

{us, {:error, trap}} = :timer.tc(fn -> Capsid.call(fueled, "spin", []) end)
IO.puts("  Capsid.call(fueled, \"spin\", [])  # loop {}, instance has fuel: 200_000_000")
IO.puts("    => #{Exception.message(trap)} (after #{div(us, 1000)} ms)")

{us, {:error, trap}} = :timer.tc(fn -> Capsid.call(timed, "spin", []) end)
IO.puts("  Capsid.call(timed, \"spin\", [])  # loop {}, instance has fuel: :infinity, timeout: 300")
IO.puts("    => #{Exception.message(trap)} (after #{div(us, 1000)} ms)")

{:error, trap} = Capsid.call(fueled, "panic-with", ["invariant violated"])
IO.puts("  Capsid.call(fueled, \"panic-with\", [\"invariant violated\"])")
IO.puts("    => #{Exception.message(trap) |> String.replace("\n", "\n       ")}")

IO.puts("  meanwhile a ticker process ticked every 10 ms: #{Task.await(ticker)} of 40 ticks done")

show.(
  ~s|Capsid.call(fueled, "ok", [41])  # the instance recycled itself|,
  Capsid.call(fueled, "ok", [41])
)

show.(~s|Capsid.call(timed, "ok", [41])|, Capsid.call(timed, "ok", [41]))

for {name, pid} <- [fueled: fueled, timed: timed] do
  info = Capsid.Instance.info(pid)
  traps = info.traps |> Enum.reject(fn {_, n} -> n == 0 end) |> Map.new()
  IO.puts("  #{name} info: calls=#{info.calls} recycles=#{info.recycles} traps=#{inspect(traps)}")
end

section.("Hot swap: v1 -> v2 -> rollback, while 4 processes call without pause")
v1 = Capsid.Guests.path(:greeter_v1)
v2 = Capsid.Guests.path(:greeter_v2)
{:ok, _} = Capsid.deploy(:greeter, v1, size: 2)
stop_streams = call_streams.(4, fn -> Capsid.call(:greeter, "hello", ["Ada"]) end)
Process.sleep(200)

for {label, action} <- [
      {"Capsid.deploy(:greeter, v2)", fn -> Capsid.deploy(:greeter, v2) end},
      {"Capsid.rollback(:greeter)", fn -> Capsid.rollback(:greeter) end}
    ] do
  {us, {:ok, info}} = :timer.tc(action)

  IO.puts(
    "  #{label}  # #{div(us, 1000)} ms; now serving sha256 #{String.slice(info.current.hash, 0, 12)}… " <>
      "(deployment step #{info.current.version})"
  )

  show.(~s|  Capsid.call(:greeter, "hello", ["Ada"])|, Capsid.call(:greeter, "hello", ["Ada"]))
  Process.sleep(200)
end

{:error, error} = Capsid.deploy(:greeter, Capsid.Guests.path(:greeter_bad))
IO.puts("  Capsid.deploy(:greeter, greeter_bad)  # refused, the running version keeps serving")
IO.puts("    message: #{Exception.message(error)}")
Process.sleep(100)
tally = stop_streams.()

IO.puts("  the call stream, by reply:")

for {reply, n} <- Enum.sort_by(tally, fn {_, n} -> -n end),
    do: IO.puts("    #{String.pad_leading(Integer.to_string(n), 7)} x #{inspect(reply)}")

failed =
  tally |> Enum.reject(fn {r, _} -> match?({:ok, _}, r) end) |> Enum.map(&elem(&1, 1)) |> Enum.sum()

IO.puts("  failed calls: #{failed}")
{:ok, versions} = Capsid.versions(:greeter)

IO.puts(
  "  Capsid.versions(:greeter): current step #{versions.current.version} " <>
    "(#{Path.basename(versions.current.source)}), previous step #{versions.previous.version} " <>
    "(#{Path.basename(versions.previous.source)})"
)

:ok = Capsid.undeploy(:greeter)

section.("Serving HTTP: a componentize-js fetch handler on a port, swapped under requests")
# wasi:http/proxy components built by componentize-js (12 MB of SpiderMonkey
# each; compiled once, then from the cache).
http_dir = Path.join(File.cwd!(), "test/fixtures/foreign/http_js")
{us, {:ok, _}} = :timer.tc(fn -> Capsid.deploy(:site, Path.join(http_dir, "http_v1.wasm")) end)
IO.puts("  Capsid.deploy(:site, \"http_v1.wasm\")  # #{div(us, 1000)} ms (compile or cache)")
{:ok, _} = Capsid.Component.load(Path.join(http_dir, "http_v2.wasm"))
{:ok, server} = Capsid.HTTP.Server.start_link(target: :site, port: 0)
port = Capsid.HTTP.Server.port(server)
IO.puts("  Capsid.HTTP.Server.start_link(target: :site, port: 0)  # serving on 127.0.0.1:#{port}")

curl = fn method, path, body ->
  url = ~c"http://127.0.0.1:#{port}#{path}"

  request =
    if method == :get,
      do: {url, [{~c"x-agent", ~c"demo"}]},
      else: {url, [{~c"x-agent", ~c"demo"}], ~c"text/plain", body}

  {:ok, {{_, status, _}, headers, resp_body}} =
    :httpc.request(method, request, [timeout: 10_000], body_format: :binary)

  {status, headers, resp_body}
end

{status, _, body} = curl.(:get, "/", "")
IO.puts("  curl http://127.0.0.1:#{port}/              => #{status} #{inspect(body)}")
{status, headers, body} = curl.(:post, "/echo?x=1", "ping")
seen = for {k, v} <- headers, k in [~c"x-method", ~c"x-path"], do: "#{k}: #{v}"

IO.puts(
  "  curl -d ping http://127.0.0.1:#{port}/echo?x=1  => #{status} #{inspect(body)} (#{Enum.join(seen, ", ")})"
)

{status, _, _} = curl.(:get, "/boom", "")

IO.puts(
  "  curl http://127.0.0.1:#{port}/boom          => #{status} (the handler threw; the VM carries on)"
)

stop_clients =
  call_streams.(2, fn ->
    {status, _, body} = curl.(:get, "/", "")
    {status, body}
  end)

Process.sleep(500)
{us, {:ok, _}} = :timer.tc(fn -> Capsid.deploy(:site, Path.join(http_dir, "http_v2.wasm")) end)

IO.puts(
  "  Capsid.deploy(:site, \"http_v2.wasm\")  # hot swap in #{div(us, 1000)} ms, while 2 clients request /"
)

Process.sleep(500)
http_tally = stop_clients.()

IO.puts("  the requests, by response:")

for {{status, body}, n} <- Enum.sort(http_tally),
    do: IO.puts("    #{String.pad_leading(Integer.to_string(n), 7)} x #{status} #{inspect(body)}")

http_failed =
  http_tally |> Enum.reject(fn {{s, _}, _} -> s == 200 end) |> Enum.map(&elem(&1, 1)) |> Enum.sum()

IO.puts("  failed requests: #{http_failed}")
:ok = GenServer.stop(server)
:ok = Capsid.undeploy(:site)

section.("Many nodes: a deployment on two peer nodes, upgraded under calls, one node lost")
# Two peers on 127.0.0.1 (OTP's :peer) running Capsid; this node becomes
# distributed for it (epmd is started if it is not running).
unless Node.alive?() do
  {_, 0} = System.cmd(System.find_executable("epmd"), ["-daemon"])
  # A unique name: two demos may run at once on one machine.
  demo_name = :"capsid_demo_#{System.unique_integer([:positive])}_#{System.pid()}@127.0.0.1"
  {:ok, _} = :net_kernel.start(demo_name, %{name_domain: :longnames})
end

peers =
  for i <- 1..2 do
    {:ok, peer, node} =
      :peer.start_link(%{
        name: :"capsid_demo_peer#{i}_#{System.pid()}",
        host: ~c"127.0.0.1",
        longnames: true
      })

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])
    :ok = :erpc.call(node, Application, :put_env, [:logger, :level, :error])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:capsid], 60_000)
    {peer, node}
  end

[{_, n1}, {peer2, n2}] = peers
{:ok, info} = Capsid.deploy(:calc, v1, nodes: [n1, n2], size: 1)

IO.puts(
  "  Capsid.deploy(:calc, v1, nodes: [#{n1}, #{n2}])  # #{div(info.duration_us, 1000)} ms, " <>
    "loaded: #{inspect(Map.values(info.loaded))}"
)

IO.puts("  Capsid.Cluster.nodes(:calc) = #{inspect(Capsid.Cluster.nodes(:calc))} (not this node)")

show.(
  ~s|  Capsid.call(:calc, "hello", ["Ada"])  # from this node|,
  Capsid.call(:calc, "hello", ["Ada"])
)

stop_callers = call_streams.(2, fn -> Capsid.call(:calc, "version", []) end)
Process.sleep(300)
{:ok, info} = Capsid.deploy(:calc, v2)

IO.puts(
  "  Capsid.deploy(:calc, v2)  # both nodes switched in #{div(info.duration_us, 1000)} ms: " <>
    inspect(Map.new(info.nodes, fn {n, v} -> {n, v.version} end))
)

Process.sleep(300)
:peer.stop(peer2)
IO.puts("  :peer.stop(#{n2})  # a node goes down while the calls go on")
Process.sleep(300)
cluster_tally = stop_callers.()

IO.puts("  the calls from this node, by reply:")

for {reply, n} <- Enum.sort(cluster_tally),
    do: IO.puts("    #{String.pad_leading(Integer.to_string(n), 7)} x #{inspect(reply)}")

cluster_failed =
  cluster_tally
  |> Enum.reject(fn {r, _} -> match?({:ok, _}, r) end)
  |> Enum.map(&elem(&1, 1))
  |> Enum.sum()

IO.puts("  failed calls: #{cluster_failed}")
IO.puts("  Capsid.Cluster.nodes(:calc) = #{inspect(Capsid.Cluster.nodes(:calc))}")
:ok = Capsid.undeploy(:calc)
