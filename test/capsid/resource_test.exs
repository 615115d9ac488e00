defmodule Capsid.ResourceTest do
  use ExUnit.Case, async: true

  alias Capsid.{Error, Resource}

  setup_all do
    %{component: Capsid.Component.load!(Capsid.Guests.path(:res))}
  end

  setup %{component: c} do
    pid = start_supervised!({Capsid.Instance, component: c}, id: make_ref())
    %{pid: pid}
  end

  defp cart(pid, owner \\ "ada") do
    assert {:ok, %Resource{} = cart} = Capsid.call(pid, "[constructor]cart", [owner])
    cart
  end

  defp live(pid), do: Capsid.call!(pid, "live", [])

  defp assert_stale(result, pattern \\ "stale") do
    assert {:error, %Error{kind: :stale_resource, message: msg}} = result
    assert msg =~ pattern
    msg
  end

  test "constructor, methods and statics, by canonical and qualified names", %{pid: pid} do
    cart = cart(pid)
    assert cart.name == "cart"
    assert cart.instance == pid
    assert inspect(cart) == "#Capsid.Resource<cart in #{inspect(pid)}>"

    assert Capsid.call(pid, "[method]cart.add", [cart, "apple", 2]) == {:ok, nil}

    assert Capsid.call(pid, "capsid:res/shop@0.1.0#[method]cart.add", [cart, "pear", 3]) ==
             {:ok, nil}

    assert Capsid.call(pid, "[method]cart.count", [cart]) == {:ok, 5}
    assert Capsid.call(pid, "[method]cart.owner", [cart]) == {:ok, "ada"}

    other = cart(pid, "bob")
    Capsid.call!(pid, "[method]cart.add", [other, "fig", 1])
    assert {:ok, both} = Capsid.call(pid, "[static]cart.merge", [cart, other])
    assert Capsid.call(pid, "[method]cart.owner", [both]) == {:ok, "ada+bob"}
    assert Capsid.call(pid, "[method]cart.count", [both]) == {:ok, 6}
    # Borrowed, not taken: both are still usable, and the same one twice too.
    assert Capsid.call(pid, "[method]cart.count", [cart]) == {:ok, 5}
    assert {:ok, _} = Capsid.call(pid, "[static]cart.merge", [cart, cart])
  end

  test "the component's types name the resource" do
    c = Capsid.Component.load!(Capsid.Guests.path(:res))
    add = Enum.find(Capsid.Component.exports(c), &(&1.function == "[method]cart.add"))
    assert [{"self", {:borrow, "cart"}} | _] = add.params
    ctor = Enum.find(Capsid.Component.exports(c), &(&1.function == "[constructor]cart"))
    assert ctor.result == {:own, "cart"}
  end

  test "an own argument gives the object away: the handle is used up", %{pid: pid} do
    base = live(pid)
    cart = cart(pid)
    Capsid.call!(pid, "[method]cart.add", [cart, "apple", 4])
    assert live(pid) == base + 1
    assert Capsid.call(pid, "consume", [cart]) == {:ok, 4}
    assert live(pid) == base
    assert_stale(Capsid.call(pid, "[method]cart.count", [cart]), "passed to the guest")
    assert_stale(Capsid.call(pid, "consume", [cart]))
    assert_stale(Resource.drop(cart))
  end

  test "drop/1 runs the destructor at once; a second drop or a later use is stale",
       %{pid: pid} do
    base = live(pid)
    cart = cart(pid)
    assert live(pid) == base + 1
    assert Resource.drop(cart) == :ok
    assert live(pid) == base
    assert_stale(Resource.drop(cart), "dropped")
    assert_stale(Capsid.call(pid, "[method]cart.count", [cart]), "dropped")
    assert_raise Error, fn -> Resource.drop!(cart) end
  end

  test "handles garbage-collected in Elixir are dropped by the instance's next call",
       %{pid: pid} do
    base = live(pid)

    # The handles live and die in another process's heap.
    task = Task.async(fn -> for _ <- 1..25, do: cart(pid) end)
    _ = Task.await(task)
    assert live(pid) == base + 25 or live(pid) == base

    # The task's result (the list of handles) is garbage here too.
    :erlang.garbage_collect()
    Process.sleep(50)
    assert live(pid) == base
  end

  test "handles anywhere in a value: lists, options, records", %{pid: pid} do
    base = live(pid)
    assert {:ok, carts} = Capsid.call(pid, "make-many", ["zoe", 3])
    assert [%Resource{name: "cart"} | _] = carts
    assert length(carts) == 3
    for c <- carts, do: Capsid.call!(pid, "[method]cart.add", [c, "x", 2])
    assert Capsid.call(pid, "total", [carts]) == {:ok, 6}

    assert {:ok, %Resource{}} = Capsid.call(pid, "maybe", ["max"])
    assert Capsid.call(pid, "maybe", [nil]) == {:ok, nil}

    [first | _] = carts

    assert {:ok, %{label: "gift", cart: %Resource{} = labelled}} =
             Capsid.call(pid, "label", [first, "gift"])

    assert_stale(Capsid.call(pid, "[method]cart.count", [first]))
    assert Capsid.call(pid, "unlabel", [%{label: "gift", cart: labelled}]) == {:ok, 2}
    for c <- tl(carts), do: :ok = Resource.drop(c)
    :erlang.garbage_collect()
    assert live(pid) <= base + 1
  end

  test "a result of 30,000 handles (converted on a dirty scheduler)",
       %{component: c} do
    pid = start_supervised!({Capsid.Instance, component: c, max_handles: 70_000}, id: make_ref())
    base = live(pid)
    # A list's size is not bounded by its type: the result is lifted and
    # converted on a dirty scheduler, and every handle stays usable.
    assert {:ok, carts} = Capsid.call(pid, "make-many", ["bulk", 30_000])
    assert length(carts) == 30_000
    assert live(pid) == base + 30_000
    assert Capsid.call(pid, "[method]cart.owner", [List.last(carts)]) == {:ok, "bulk"}
    assert Capsid.call(pid, "total", [carts]) == {:ok, 0}
    for c <- carts, do: :ok = Resource.drop(c)
    assert live(pid) == base
  end

  test "a bad argument next to a handle loses nothing", %{pid: pid} do
    cart = cart(pid)
    Capsid.call!(pid, "[method]cart.add", [cart, "apple", 1])
    assert {:error, %Error{kind: :bad_argument}} = Capsid.call(pid, "label", [cart, 42])
    assert Capsid.call(pid, "[method]cart.count", [cart]) == {:ok, 1}
  end

  test "forged handles are refused", %{pid: pid} do
    for forged <- [
          %Resource{ref: make_ref(), name: "cart", instance: pid},
          %{__struct__: Resource, ref: make_ref(), name: "cart"},
          %{ref: 42},
          make_ref(),
          7
        ] do
      assert {:error, %Error{kind: :bad_argument, message: msg}} =
               Capsid.call(pid, "[method]cart.count", [forged])

      assert msg =~ "Capsid.Resource handle of cart"
    end
  end

  test "a trap recycles the instance: its handles are stale", %{pid: pid} do
    cart = cart(pid)
    assert {:error, %Capsid.Trap{}} = Capsid.call(pid, "[method]cart.fail", [cart])
    assert_stale(Capsid.call(pid, "[method]cart.count", [cart]), "recycled")
    # The fresh instance works, with fresh handles.
    assert Capsid.call(pid, "[method]cart.count", [cart(pid)]) == {:ok, 0}
  end

  test "a handle is bound to its instance", %{pid: pid, component: c} do
    cart = cart(pid)
    other = start_supervised!({Capsid.Instance, component: c}, id: make_ref())
    assert_stale(Capsid.call(other, "[method]cart.count", [cart]), "another instance")
    assert Capsid.call(pid, "[method]cart.count", [cart]) == {:ok, 0}
  end

  test "through a pool, a call with handles runs on the member that made them",
       %{component: c} do
    {:ok, pool} = Capsid.Pool.start_link(component: c, size: 3)

    carts =
      for i <- 1..12 do
        {:ok, cart} = Capsid.call(pool, "[constructor]cart", ["p#{i}"])
        cart
      end

    assert carts |> Enum.map(& &1.instance) |> Enum.uniq() |> length() >= 1

    for {cart, i} <- Enum.with_index(carts, 1) do
      assert Capsid.call(pool, "[method]cart.owner", [cart]) == {:ok, "p#{i}"}
      assert Resource.drop(cart) == :ok
    end
  end

  test "a hot swap makes the old version's handles stale", %{component: c} do
    name = :"res_swap_#{System.unique_integer([:positive])}"
    path = Capsid.Guests.path(:res)
    {:ok, _} = Capsid.deploy(name, path, size: 2)
    on_exit(fn -> Capsid.undeploy(name) end)
    {:ok, cart} = Capsid.call(name, "[constructor]cart", ["ada"])
    assert Capsid.call(name, "[method]cart.count", [cart]) == {:ok, 0}

    # The same component again, as a new version: new instances.
    {:ok, %{current: %{version: 2}}} = Capsid.deploy(name, File.read!(path), force: true)
    assert_stale(Capsid.call(name, "[method]cart.count", [cart]))
    assert {:ok, fresh} = Capsid.call(name, "[constructor]cart", ["bob"])
    assert Capsid.call(name, "[method]cart.owner", [fresh]) == {:ok, "bob"}
    assert c.hash == Capsid.Component.load!(path).hash
  end

  test "an upgrade's compatibility check covers resource methods and resource types",
       %{component: c} do
    ledger = Capsid.Component.load!(Capsid.Guests.path(:ledger))
    problems = Capsid.Deployment.incompatibilities(c, ledger)
    assert Enum.any?(problems, &(&1 =~ "#[constructor]cart is missing"))
    assert Enum.any?(problems, &(&1 =~ "#[method]cart.add is missing"))
    assert Enum.any?(problems, &(&1 =~ "#[static]cart.merge is missing"))

    # The same component with its resource renamed: every function that
    # takes or gives one changed type.
    rename = fn
      {:own, "cart"} -> {:own, "basket"}
      {:borrow, "cart"} -> {:borrow, "basket"}
      t -> t
    end

    renamed =
      Enum.map(c.exports, fn e ->
        %{
          e
          | params: Enum.map(e.params, fn {n, t} -> {n, rename.(t)} end),
            result: rename.(e.result)
        }
      end)

    problems = Capsid.Deployment.incompatibilities(c, %{c | exports: renamed})
    assert Enum.any?(problems, &(&1 =~ "#[method]cart.add changed type"))
    assert Enum.any?(problems, &(&1 =~ "own<cart>) -> u32 → func(c: own<basket>) -> u32"))
    assert Capsid.Deployment.incompatibilities(c, c) == []
  end

  describe "bindings" do
    alias Capsid.Test.Res.Shop
    alias Capsid.Test.Res.Shop.Cart

    test "a module per resource: new, methods on the handle, statics on the target",
         %{pid: pid} do
      assert {:ok, %Resource{} = cart} = Cart.new(pid, "ada")
      assert Cart.add(cart, "apple", 2) == {:ok, nil}
      assert Cart.add!(cart, "pear", 1, timeout: 1_000) == nil
      assert Cart.count!(cart) == 3
      other = Cart.new!(pid, "bob")
      both = Cart.merge!(pid, cart, other)
      assert Cart.owner!(both) == "ada+bob"
      assert Shop.consume!(pid, both) == 3
      assert {:error, %Error{kind: :stale_resource}} = Cart.count(both)
    end

    test "specs and docs use Capsid.Resource.t()" do
      {:ok, specs} = Code.Typespec.fetch_specs(Cart)
      {_, [spec | _]} = List.keyfind(specs, {:add, 3}, 0)

      assert Code.Typespec.spec_to_quoted(:add, spec) |> Macro.to_string() =~
               "add(Capsid.Resource.t(), String.t(), 0..4_294_967_295)"

      {:docs_v1, _, _, _, _, _, docs} = Code.fetch_docs(Cart)

      assert Enum.any?(docs, fn
               {{:function, :add, 4}, _, _, %{"en" => d}, _} ->
                 d =~ "[method]cart.add: func(self: borrow<cart>, item: string, qty: u32)"

               _ ->
                 false
             end)
    end
  end
end
